"""The compute of the curation stages (core/curation.py): k-means centroids, assignment of a scored
shard's selected rows to clusters, and the dedup of one cluster. Pure functions of storage; faiss
for k-means and nearest-centroid search, numpy for the exact greedy (core/selection.py)."""
from __future__ import annotations

import io
from typing import Any

import faiss
import numpy as np

from clipbatch.core import layout
from clipbatch.core.curation import (SAMPLE_MAX, SAMPLE_PARTS, SAMPLE_PER_CLUSTER, SPLIT_FACTOR, CurationPlan,
                                     load_parts, read_metadata, read_rows)
from clipbatch.core.selection import near_duplicates
from clipbatch.core.storage import Storage, open_storage, split
from clipbatch.workers.samples import IMAGE_EXTS, content_hash, iter_raw_samples

KMEANS_ITERATIONS = 20
SEED = 1234
Files = dict[str, bytes]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _normalised(emb: np.ndarray) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def _kmeans(points: np.ndarray, k: int) -> np.ndarray:
    """Spherical k-means with a fixed seed; fewer points than ``k`` are their own centroids."""
    if len(points) <= k:
        return points.copy()
    km = faiss.Kmeans(points.shape[1], k, niter=KMEANS_ITERATIONS, seed=SEED, spherical=True,
                      max_points_per_centroid=len(points), verbose=False)
    km.train(points)
    return km.centroids.copy()


def train_centroids(plan: CurationPlan, output: Storage) -> tuple[Files, dict[str, Any]]:
    """The clusters stage: centroids from a seeded random sample of the selected rows of at most
    SAMPLE_PARTS scored shards (at most SAMPLE_MAX rows), whatever the size of the output."""
    if plan.route != "cluster" or plan.clusters == 1:
        return {layout.CENTROIDS: _npy(np.zeros((0, 0), np.float32))}, {"sample": 0}
    rng = np.random.default_rng(SEED)
    parts = load_parts(output)
    chosen = sorted(rng.choice(parts, min(len(parts), SAMPLE_PARTS), replace=False).tolist())
    scored = open_storage(plan.scored)
    per_part = -(-min(SAMPLE_MAX, SAMPLE_PER_CLUSTER * plan.clusters) // len(chosen))
    sample = []
    for part in chosen:  # one shard's embeddings in memory at a time
        scores = read_metadata(scored, part, ["clip_score"])["clip_score"]
        rows = np.nonzero(scores >= plan.threshold)[0]
        rows = np.sort(rng.choice(rows, min(per_part, len(rows)), replace=False))
        sample.append(np.load(io.BytesIO(scored.read(layout.embed_files(part)["img"])))[rows])
    points = np.concatenate(sample)
    centroids = _kmeans(_normalised(points), plan.clusters)
    return {layout.CENTROIDS: _npy(centroids)}, {"sample": len(points)}


def row_dtype(dim: int) -> np.dtype:
    """One selected row on its way to dedup: where it came from, its score, its image hash, its embedding."""
    return np.dtype([("part", "<i4"), ("row", "<i4"), ("score", "<f4"), ("hash", "S32"), ("emb", "<f2", (dim,))])


def _hashes_from_source(scored: Storage, part: int, keys: list[str], shards: list[str]) -> list[str]:
    """Older outputs have no image_hash column: hash the image bytes from the source tar."""
    found: dict[str, str] = {}
    for uri in sorted(set(shards)):
        parent, name = split(uri)
        with open_storage(parent).open_read(name) as stream:
            for raw in iter_raw_samples(stream):
                ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
                if ext is not None:
                    found[raw.key] = content_hash(raw.members[ext])
    missing = [k for k in keys if k not in found]
    if missing:
        raise FileNotFoundError(f"sample {missing[0]} of scored shard {part} is no longer in its source shard")
    return [found[k] for k in keys]


def _selected_rows(plan: CurationPlan, scored: Storage, part: int) -> tuple[np.ndarray, int]:
    meta = read_metadata(scored, part, ["key", "shard", "clip_score", "image_hash"])
    scores = meta["clip_score"]
    chosen = np.nonzero(scores >= plan.threshold)[0]
    emb = np.load(io.BytesIO(scored.read(layout.embed_files(part)["img"]))) if plan.dedup_cosine is not None \
        else np.zeros((len(scores), 0), np.float16)
    rows = np.zeros(len(chosen), row_dtype(emb.shape[1]))
    rows["part"], rows["row"], rows["score"] = part, chosen, scores[chosen]
    rows["emb"] = emb[chosen]
    if plan.dedup_exact and len(chosen):
        hashes = meta.get("image_hash")
        if hashes is None:
            hashes = _hashes_from_source(scored, part, [meta["key"][r] for r in chosen],
                                         [meta["shard"][r] for r in chosen])
        else:
            hashes = [hashes[r] for r in chosen]
        rows["hash"] = np.array(hashes, "S32")
    return rows, len(scores)


def assign_part(plan: CurationPlan, output: Storage, part: int) -> tuple[Files, dict[str, Any]]:
    """The assign stage for scored shard ``part``: its rows at or above the threshold, each routed to a
    cluster (nearest centroid, image hash, or the shard itself), one file per cluster it reaches."""
    rows, total = _selected_rows(plan, open_storage(plan.scored), part)
    if plan.route == "cluster" and plan.clusters > 1 and len(rows):
        centroids = read_rows(output, layout.CENTROIDS).astype(np.float32)
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        cluster = index.search(_normalised(rows["emb"]), 1)[1][:, 0]
    elif plan.route == "hash":
        cluster = np.array([int(h[:15] or b"0", 16) % plan.clusters for h in rows["hash"]], np.int64)
    elif plan.route == "part":
        cluster = np.full(len(rows), load_parts(output).index(part) % plan.clusters)
    else:
        cluster = np.zeros(len(rows), np.int64)
    files = {layout.assigned(int(c), part): _npy(rows[cluster == c]) for c in np.unique(cluster)}
    return files, {"rows": total, "selected": len(rows), "clusters_reached": len(files)}


def _dedup_order(rows: np.ndarray) -> np.ndarray:
    """Highest score first, so the best of a group of duplicates is kept; ties by source order."""
    return np.lexsort((rows["row"], rows["part"], -rows["score"]))


def _exact_duplicates(rows: np.ndarray) -> np.ndarray:
    """True for rows (in dedup order) whose image hash an earlier row has."""
    _, first = np.unique(rows["hash"], return_index=True)
    dropped = np.ones(len(rows), bool)
    dropped[first] = False
    return dropped


def _near_duplicates(rows: np.ndarray, cosine: float, cluster_size: int) -> tuple[np.ndarray, int]:
    """The exact greedy within the cluster; a cluster over SPLIT_FACTOR x cluster_size is split first
    by a seeded sub-k-means, and each piece deduped on its own (in the same order)."""
    if len(rows) <= SPLIT_FACTOR * cluster_size:
        return near_duplicates(rows["emb"], cosine), 1
    emb = _normalised(rows["emb"])
    pieces = -(-len(rows) // cluster_size)
    centroids = _kmeans(emb[:: max(1, len(emb) // (SAMPLE_PER_CLUSTER * pieces))], pieces)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    piece = index.search(emb, 1)[1][:, 0]
    dropped = np.zeros(len(rows), bool)
    for p in np.unique(piece):
        where = np.nonzero(piece == p)[0]
        dropped[where] = near_duplicates(emb[where], cosine)
    return dropped, len(centroids)


def dedup_cluster(plan: CurationPlan, output: Storage, cluster: int) -> tuple[Files, dict[str, Any]]:
    """The dedup stage for one cluster: every assign file of it, in descending score order; exact
    duplicates (same image hash) then near duplicates dropped; a keep list per scored shard."""
    found = [read_rows(output, key) for key in sorted(output.list(layout.assigned_dir(cluster)))]
    rows = np.concatenate(found) if found else np.zeros(0, row_dtype(0))
    rows = rows[_dedup_order(rows)]
    exact = _exact_duplicates(rows) if plan.dedup_exact else np.zeros(len(rows), bool)
    near, split_into = np.zeros(len(rows), bool), 1
    if plan.dedup_cosine is not None and len(rows):
        rest = np.nonzero(~exact)[0]
        near_rest, split_into = _near_duplicates(rows[rest], plan.dedup_cosine, plan.cluster_size)
        near[rest] = near_rest
    kept = rows[~(exact | near)]
    files, kept_parts = {}, {}
    for part in np.unique(kept["part"]):
        mine = np.sort(kept["row"][kept["part"] == part]).astype(np.int32)
        files[layout.kept(cluster, int(part))] = _npy(mine)
        kept_parts[str(int(part))] = len(mine)
    record = {"selected": len(rows), "exact_dropped": int(exact.sum()), "near_dropped": int(near.sum()),
              "kept_parts": kept_parts, "split": split_into}
    return files, record
