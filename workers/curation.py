"""The compute of the curation stages (core/curation.py): k-means centroids, assignment of a scored
shard's selected rows to clusters (nearest and second centroid), and the dedup of one group of clusters,
cluster by cluster, which also leaves its rows near a boundary for the boundary pass (workers/boundary.py).
Pure functions of storage; faiss
for k-means and nearest-centroid search, numpy for the exact greedy (core/selection.py)."""
from __future__ import annotations

import io
from typing import Any

import faiss
import numpy as np

from clipbatch.core import layout
from clipbatch.core.curation import TUNING, CurationPlan, boundary_margin, load_parts, read_metadata, read_rows
from clipbatch.core.results import Files
from clipbatch.core.selection import near_duplicates
from clipbatch.core.storage import Storage, open_storage, split
from clipbatch.workers.samples import IMAGE_EXTS, content_hash, iter_raw_samples



def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def normalised(emb: np.ndarray) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def nearest(centroids: np.ndarray, emb: np.ndarray, n: int, block: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Each (unit) row's ``n`` most similar centroids, in order, with their similarities (-1 and -inf: none).

    faiss proposes the TUNING.candidates most similar by its batched products, which differ in the last bits with
    its thread count; their similarities are then computed again row by row and ties go to the lower
    centroid, so the answer is the same on any machine and thread count (unless a row's n-th and
    (TUNING.candidates + 1)-th centroids tie to the last bits)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    k = min(len(centroids), max(n, TUNING.candidates))
    ids = index.search(emb, k)[1]
    sims = np.empty(ids.shape, np.float32)
    for start in range(0, len(emb), block):
        rows, mine = emb[start:start + block], ids[start:start + block]
        for j in range(k):
            sims[start:start + block, j] = np.einsum("ij,ij->i", rows, centroids[np.maximum(mine[:, j], 0)])
    sims[ids < 0] = -np.inf
    order = np.lexsort((ids, -sims), axis=-1)[:, :n]
    ids, sims = np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)
    if k < n:
        ids, sims = np.pad(ids, ((0, 0), (0, n - k)), constant_values=-1), np.pad(sims, ((0, 0), (0, n - k)),
                                                                                 constant_values=-np.inf)
    return sims, ids


def _kmeans(points: np.ndarray, k: int) -> np.ndarray:
    """Spherical k-means (Lloyd) from k seeded rows; fewer points than ``k`` are their own centroids.
    Assignments by :func:`nearest` and sums in one fixed order (numpy), so the centroids are the same
    whatever the thread count (faiss's own k-means was not: at 10^7 pairs one thread and two gave
    centroids that kept 41 pairs apart). An empty cluster keeps its centroid."""
    if len(points) <= k:
        return points.copy()
    centroids = points[np.sort(np.random.default_rng(TUNING.seed).choice(len(points), k, replace=False))].copy()
    for _ in range(TUNING.kmeans_iterations):
        assign = nearest(centroids, points, 1)[1][:, 0]
        order = np.argsort(assign, kind="stable")
        present, starts = np.unique(assign[order], return_index=True)
        centroids[present] = normalised(np.add.reduceat(points[order], starts, axis=0))
    return centroids


def train_centroids(plan: CurationPlan, output: Storage) -> tuple[Files, dict[str, Any]]:
    """The clusters stage: centroids from a seeded random sample of the selected rows of at most
    TUNING.sample_parts scored shards (at most TUNING.sample_max rows), whatever the size of the output."""
    if plan.route != "cluster" or plan.clusters == 1:
        return {layout.CENTROIDS: npy(np.zeros((0, 0), np.float32))}, {"sample": 0}
    rng = np.random.default_rng(TUNING.seed)
    parts = load_parts(output)
    chosen = sorted(rng.choice(parts, min(len(parts), TUNING.sample_parts), replace=False).tolist())
    scored = open_storage(plan.scored)
    per_part = -(-min(TUNING.sample_max, TUNING.sample_per_cluster * plan.clusters) // len(chosen))
    sample = []
    for part in chosen:  # one shard's embeddings in memory at a time
        scores = read_metadata(scored, part, ["clip_score"])["clip_score"]
        rows = np.nonzero(scores >= plan.threshold)[0]
        rows = np.sort(rng.choice(rows, min(per_part, len(rows)), replace=False))
        sample.append(np.load(io.BytesIO(scored.read(layout.embed_files(part)["img"])))[rows])
    points = np.concatenate(sample)
    centroids = _kmeans(normalised(points), plan.clusters)
    return {layout.CENTROIDS: npy(centroids)}, {"sample": len(points)}


def row_dtype(dim: int) -> np.dtype:
    """One selected row on its way to dedup: where it came from, its cluster, its score, its image hash, its
    second nearest centroid and how much less similar it is than the nearest (-1 and inf: none), its embedding."""
    return np.dtype([("part", "<i4"), ("row", "<i4"), ("cluster", "<i4"), ("score", "<f4"), ("hash", "S32"),
                     ("second", "<i4"), ("gap", "<f4"), ("emb", "<f2", (dim,))])


def edge_dtype(dim: int) -> np.dtype:
    """A row near the boundary of clusters ``lo`` < ``hi``, for the boundary pass: a kept one (``anchor`` = 1: it
    must stay kept), or one dropped (``dropped`` = 1) only for kept rows near the same boundary (it comes back if
    they go)."""
    return np.dtype([("part", "<i4"), ("row", "<i4"), ("lo", "<i4"), ("hi", "<i4"), ("score", "<f4"),
                     ("dropped", "u1"), ("anchor", "u1"), ("emb", "<f2", (dim,))])


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
    rows["second"], rows["gap"] = -1, np.inf
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
    cluster (nearest centroid, image hash, or the shard itself), one file per group of clusters it reaches."""
    rows, total = _selected_rows(plan, open_storage(plan.scored), part)
    if plan.route == "cluster" and plan.clusters > 1 and len(rows):
        centroids = read_rows(output, layout.CENTROIDS).astype(np.float32)
        similarity, best = nearest(centroids, normalised(rows["emb"]), 2)
        cluster = best[:, 0]
        second = best[:, 1] >= 0
        rows["second"][second] = best[second, 1]
        rows["gap"][second] = similarity[second, 0] - similarity[second, 1]
    elif plan.route == "hash":
        cluster = np.array([int(h[:15] or b"0", 16) % plan.clusters for h in rows["hash"]], np.int64)
    elif plan.route == "part":
        cluster = np.full(len(rows), load_parts(output).index(part) % plan.clusters)
    else:
        cluster = np.zeros(len(rows), np.int64)
    rows["cluster"] = cluster
    group = plan.group_of(rows["cluster"])
    files = {layout.assigned(int(g), part): npy(rows[group == g]) for g in np.unique(group)}
    return files, {"rows": total, "selected": len(rows), "groups_reached": len(files)}


def _exact_duplicates(rows: np.ndarray) -> np.ndarray:
    """True for rows (in dedup order) whose image hash an earlier row has."""
    _, first = np.unique(rows["hash"], return_index=True)
    dropped = np.ones(len(rows), bool)
    dropped[first] = False
    return dropped


def _near_duplicates(rows: np.ndarray, cosine: float, cluster_size: int) -> tuple[np.ndarray, int]:
    """The exact greedy within the cluster; a cluster over TUNING.split_factor x cluster_size is split first
    by a seeded sub-k-means, and each piece deduped on its own (in the same order)."""
    if len(rows) <= TUNING.split_factor * cluster_size:
        return near_duplicates(rows["emb"], cosine), 1
    emb = normalised(rows["emb"])
    pieces = -(-len(rows) // cluster_size)
    centroids = _kmeans(emb[:: max(1, len(emb) // (TUNING.sample_per_cluster * pieces))], pieces)
    piece = nearest(centroids, emb, 1)[1][:, 0]
    dropped = np.zeros(len(rows), bool)
    for p in np.unique(piece):
        where = np.nonzero(piece == p)[0]
        dropped[where] = near_duplicates(emb[where], cosine)
    return dropped, len(centroids)


def runs(rows: np.ndarray, *keys: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``rows`` sorted by ``keys``, then in dedup order (highest score first, so the best of a group of
    duplicates is kept; ties by source order), and the (start, stop) of each run of equal keys."""
    rows = rows[np.lexsort((rows["row"], rows["part"], -rows["score"], *(rows[k] for k in reversed(keys))))]
    change = np.zeros(max(0, len(rows) - 1), bool)
    for k in keys:
        change |= np.diff(rows[k]) != 0
    bounds = (np.flatnonzero(change) + 1).tolist()
    return rows, list(zip([0, *bounds], [*bounds, len(rows)])) if len(rows) else []


def _dedup(plan: CurationPlan, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One cluster's rows, in dedup order: exact duplicates (same image hash), then near duplicates among
    the rest; and how many pieces the cluster was split into."""
    exact = _exact_duplicates(rows) if plan.dedup_exact else np.zeros(len(rows), bool)
    near, split_into = np.zeros(len(rows), bool), 1
    if plan.dedup_cosine is not None and len(rows):
        rest = np.nonzero(~exact)[0]
        near_rest, split_into = _near_duplicates(rows[rest], plan.dedup_cosine, plan.cluster_size)
        near[rest] = near_rest
    return exact, near, split_into


def dedup_group(plan: CurationPlan, output: Storage, group: int) -> tuple[Files, dict[str, Any]]:
    """The dedup stage for one group of clusters: every assign file of it; each cluster on its own, in
    descending score order, exact then near duplicates dropped; a keep list per scored shard, and the rows
    near a boundary per group of the pair's lower cluster."""
    found = [read_rows(output, key) for key in sorted(output.list(layout.assigned_dir(group)))]
    rows = np.concatenate(found) if found else np.zeros(0, row_dtype(0))
    rows, spans = runs(rows, "cluster")
    exact, near = np.zeros(len(rows), bool), np.zeros(len(rows), bool)
    edges, split, largest = [], 0, 0
    for lo, hi in spans:
        mine = rows[lo:hi]
        exact[lo:hi], near[lo:hi], split_into = _dedup(plan, mine)
        split, largest = split + (split_into > 1), max(largest, hi - lo)
        edges.append(_edges(plan, int(mine["cluster"][0]), mine, exact[lo:hi], near[lo:hi]))
    kept = rows[~(exact | near)]
    files, kept_parts = {}, {}
    for part in np.unique(kept["part"]):
        mine = np.sort(kept["row"][kept["part"] == part]).astype(np.int32)
        files[layout.kept(group, int(part))] = npy(mine)
        kept_parts[str(int(part))] = len(mine)
    edge = np.concatenate(edges) if edges else np.zeros(0, edge_dtype(0))
    to = plan.group_of(edge["lo"])
    for g in np.unique(to).tolist():
        files[layout.edge(g, group)] = npy(edge[to == g])
    record = {"selected": len(rows), "exact_dropped": int(exact.sum()), "near_dropped": int(near.sum()),
              "kept_parts": kept_parts, "largest_cluster": largest, "split_clusters": split, "boundary_rows": len(edge)}
    return files, record


def _dependents(emb: np.ndarray, edge: np.ndarray, others: np.ndarray, near: np.ndarray, pair: np.ndarray,
                cosine: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The near-dropped rows that no kept row off the boundary is close to. One whose close kept rows are all
    in one pair of clusters follows them there (its pair; -1 for the others); for one whose close rows are in
    several pairs, the closest is made an anchor (it stays kept, so the row stays dropped)."""
    edge_idx, other_idx, near_idx = np.nonzero(edge)[0], np.nonzero(others)[0], np.nonzero(near)[0]
    follows, anchor = np.full(len(emb), -1), np.zeros(len(emb), bool)
    for start in range(0, len(near_idx), block):
        mine = near_idx[start:start + block]
        alone = (emb[mine] @ emb[other_idx].T).max(axis=1) < cosine if len(other_idx) else np.ones(len(mine), bool)
        sims = emb[mine[alone]] @ emb[edge_idx].T
        for row, sim in zip(mine[alone].tolist(), sims):
            pairs = np.unique(pair[edge_idx[sim >= cosine]])
            if len(pairs) == 1:
                follows[row] = pairs[0]
            else:
                anchor[edge_idx[sim.argmax()]] = True
    return follows, anchor


def _edges(plan: CurationPlan, cluster: int, rows: np.ndarray, exact: np.ndarray, near: np.ndarray) -> np.ndarray:
    """The cluster's kept rows whose second centroid is within the boundary margin, each for the pair of
    clusters (theirs and the second), with the rows dropped only for rows of one such pair."""
    out = np.zeros(0, edge_dtype(rows["emb"].shape[1]))
    if not plan.boundary or not len(rows):
        return out
    kept = ~(exact | near)
    edge = kept & (rows["second"] >= 0) & (rows["gap"] <= boundary_margin(plan.dedup_cosine, rows["emb"].shape[1]))
    if not edge.any():
        return out
    other = np.where(edge, rows["second"], -1)
    follows, anchor = _dependents(normalised(rows["emb"]), edge, kept & ~edge, near, other, plan.dedup_cosine)
    other[follows >= 0] = follows[follows >= 0]
    out = np.zeros(len(rows), out.dtype)
    for name in ("part", "row", "score", "emb"):
        out[name] = rows[name]
    out["dropped"], out["anchor"] = near, anchor
    out["lo"], out["hi"] = np.minimum(cluster, other), np.maximum(cluster, other)
    return out[other >= 0]
