"""The assign stage's nearest-centroid search (every centroid compared: O(N x K) over the job) against a
faiss IVF index over the centroids (sqrt K coarse lists, --probe of them searched: O(sqrt K) per row), the
candidate that was measured and not adopted (issue 17; docs/curation.md).

    .venv/bin/python -m bench.curation_assign --scored /work/data/c10000000/scored --parts 20 --probes 8,32

Plans the job as `clipbatch submit shards --top-fraction 0.9 --dedup-cosine 0.95 --dedup-exact` would
(default cluster size), trains the centroids with the clusters task's own code (its k-means at the time of the results was
faiss's own, since replaced by a thread-count-independent one) and the index on them,
then for the selected rows of --parts scored shards (a seeded random choice) runs both searches side by
side, interleaved per shard, and prints: rows per second of each and their ratio; the share of rows whose
nearest centroid (their cluster) agrees; the share whose second centroid agrees; and, of the rows the
exact search puts within the boundary margin (the boundary pass's rows), the share the IVF search
also puts there.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from clipbatch.core import layout
from clipbatch.core.curation import boundary_margin, load_parts, plan_curation, read_rows
from clipbatch.core.specs import TrainShardsSpec
from clipbatch.core.storage import open_storage
from clipbatch.core.curation import TUNING
from clipbatch.workers.curation import _selected_rows, nearest, normalised, train_centroids


def ivf_index(centroids: np.ndarray, probe: int) -> faiss.Index:
    lists = max(1, round(len(centroids) ** 0.5))
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    index = faiss.IndexIVFFlat(quantizer, centroids.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical, index.cp.seed, index.cp.min_points_per_centroid = True, TUNING.seed, 1
    index.train(centroids)
    index.add(centroids)
    index.nprobe = probe
    return index


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scored", required=True)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--probes", default="8,32", help="lists searched per row, one run each")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="curation-assign-"))
    spec = TrainShardsSpec(args.scored, str(out), top_fraction=0.9, dedup_cosine=0.95, dedup_exact=True)
    storage = open_storage(str(out))
    plan, _ = plan_curation(spec, storage)
    t = time.time()
    files, record = train_centroids(plan, storage)
    for key, data in files.items():
        storage.write(key, data)
    print(json.dumps({"clusters": plan.clusters, "clusters_s": time.time() - t, **record}), flush=True)
    centroids = read_rows(storage, layout.CENTROIDS).astype(np.float32)
    parts = sorted(np.random.default_rng(0).choice(load_parts(storage), args.parts, replace=False).tolist())
    for probe in map(int, args.probes.split(",")):
        compare(plan, centroids, parts, probe)


def compare(plan, centroids: np.ndarray, parts: list[int], probe: int) -> None:
    index = ivf_index(centroids, probe)
    scored = open_storage(plan.scored)
    seconds = {"exact": 0.0, "index": 0.0}
    rows_n = same_first = same_second = edge_exact = edge_both = 0
    margin = boundary_margin(0.95, centroids.shape[1])
    for part in parts:
        rows, _ = _selected_rows(plan, scored, part)
        t = time.perf_counter()
        s_exact, n_exact = nearest(centroids, normalised(rows["emb"]), 2)
        seconds["exact"] += time.perf_counter() - t
        t = time.perf_counter()
        s_index, n_index = index.search(normalised(rows["emb"]), 2)
        seconds["index"] += time.perf_counter() - t
        rows_n += len(rows)
        same_first += int((n_exact[:, 0] == n_index[:, 0]).sum())
        same_second += int((n_exact[:, 1] == n_index[:, 1]).sum())
        on_edge = (s_exact[:, 0] - s_exact[:, 1]) <= margin
        edge_exact += int(on_edge.sum())
        edge_both += int((on_edge & (s_index[:, 0] - s_index[:, 1] <= margin)).sum())
    print(json.dumps({"clusters": plan.clusters, "lists": max(1, round(plan.clusters ** 0.5)), "probe": probe,
                      "rows": rows_n, "exact_rows_per_s": rows_n / seconds["exact"],
                      "index_rows_per_s": rows_n / seconds["index"],
                      "speedup": seconds["exact"] / seconds["index"], "nearest_agrees": same_first / rows_n,
                      "second_agrees": same_second / rows_n, "edge_rows_exact": edge_exact,
                      "edge_rows_also_index": edge_both / max(1, edge_exact)}), flush=True)

if __name__ == "__main__":
    main()
