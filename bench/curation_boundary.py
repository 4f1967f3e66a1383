"""Recall of the curation stages on the harsh straddling set, at sizes the test does not run (issue 17).

    .venv/bin/python -m bench.curation_boundary --pairs 12000,40000 --seeds 11,12,13 --cluster-size 500

Every planted near-duplicate group sits half-way between two topics (tests/curation_data.plant with
boundary_share=1), so its rows straddle cluster boundaries. The stage functions (clusters, assign,
dedup, boundary, the write plan and each tar's selection) run in this process, in order, on local
storage: the same code as the tasks, without Redis or workers (the tests run it through them). Recall
(of the pairs the exact greedy removes) and precision (every dropped pair has a kept pair at cosine >=
the threshold) are computed exactly against core/selection.exact_curation; the pass-1-only recall
(dedup keep lists alone) is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from clipbatch.core.selection import exact_curation
from clipbatch.core.specs import TrainShardsSpec
from tests.curation_data import plant, recall_precision, run_stages, write_scored

COSINE, SHARDS = 0.95, 6


def curate(root: Path, pairs: int, seed: int, cluster_size: int, per_task: int | None) -> dict:
    scored, where = write_scored(root, plant(pairs, seed=seed, boundary_share=1.0), SHARDS)
    spec = TrainShardsSpec(scored, str(root / "out"), top_fraction=0.9, dedup_cosine=COSINE, dedup_exact=True,
                           cluster_size=cluster_size, samples_per_shard=2500, clusters_per_task=per_task)
    plan, markers, kept_rows, pass_one = run_stages(spec)
    kept = {where[row["key"]] for row in kept_rows}
    pass_one = {where[key] for key in pass_one}
    return {**score(spec, kept), "recall_dedup_only": score(spec, pass_one)["recall"], "clusters": plan.clusters,
            "groups": plan.groups,
            "boundary_rows": sum(markers[plan.base("boundary") + g]["rows"] for g in range(plan.boundary))}


def score(spec: TrainShardsSpec, kept: set[tuple[int, int]]) -> dict:
    return recall_precision(exact_curation(spec), kept)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="12000,40000")
    ap.add_argument("--seeds", default="11,12,13")
    ap.add_argument("--cluster-size", type=int, default=500)
    ap.add_argument("--clusters-per-task", type=int, help="default: the job's (about 100,000 pairs' worth)")
    args = ap.parse_args()
    for pairs in map(int, args.pairs.split(",")):
        for seed in map(int, args.seeds.split(",")):
            root = Path(tempfile.mkdtemp(prefix="curation-boundary-"))
            try:
                print(json.dumps({"pairs": pairs, "seed": seed, "cluster_size": args.cluster_size,
                                  **curate(root, pairs, seed, args.cluster_size, args.clusters_per_task)}), flush=True)
            finally:
                shutil.rmtree(root)


if __name__ == "__main__":
    main()
