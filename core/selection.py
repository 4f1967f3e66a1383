"""The exact single-machine curation: the reference the worker stages (core/curation.py) are
measured against, and the end of a training-shards job (``sizes.json``, ``stats.json``).

Selection by ``--min-score``, or by ``--top-fraction`` whose threshold is read off the merged
score histogram (no global sort). Near-duplicate removal is exact and greedy in descending score
order (ties by source order): a pair is dropped when its image embedding has cosine >=
``--dedup-cosine`` with a pair already kept; with ``--dedup-exact`` a pair whose image hash a
better pair has goes first. O(N x kept) time, O(N x dim) memory: the reference, not the way a
large output is curated. The dedup stage runs the same ``near_duplicates`` within each cluster.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow.parquet as pq

from clipbatch.core import commit, layout
from clipbatch.core.scores import merge, quantile
from clipbatch.core.storage import Storage, open_storage
from clipbatch.core.specs import TrainShardsSpec

DEDUP_BLOCK = 4096


def near_duplicates(embeddings: np.ndarray, cosine: float, block: int = DEDUP_BLOCK) -> np.ndarray:
    """Greedy exact dedup in the given order: True for rows too close to an earlier kept row.

    Per block: rows close to a row kept in an earlier block go first (one matrix product); then,
    inside the block, only rows with a later close row can drop anything, so the sequential pass
    visits those alone (in order: a row still standing when visited is kept and drops its later
    close rows). The same decisions as visiting every row, at the cost of the few that have one.
    """
    emb = np.array(embeddings, dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    dropped = np.zeros(len(emb), dtype=bool)
    kept = np.empty((0, emb.shape[1]), np.float32)
    for start in range(0, len(emb), block):
        chunk = emb[start:start + block]
        dup = (chunk @ kept.T).max(axis=1) >= cosine if len(kept) else np.zeros(len(chunk), bool)
        later = np.triu(chunk @ chunk.T >= cosine, 1)  # later[i, j]: j after i, and close to it
        for i in np.nonzero(later.any(axis=1))[0]:
            if not dup[i]:
                dup |= later[i]
        dropped[start:start + len(chunk)] = dup
        kept = np.concatenate([kept, chunk[~dup]])
    return dropped


@dataclass
class Reference:
    """The exact curation of a scored output: every selected row and what became of it."""

    threshold: float
    part: np.ndarray  # selected rows' scored shard, in dedup order (descending score)
    row: np.ndarray
    embeddings: np.ndarray
    exact: np.ndarray  # dropped: same image hash as a better row
    near: np.ndarray  # dropped: cosine >= dedup_cosine with a better kept row
    total: int

    @property
    def kept(self) -> list[tuple[int, int]]:
        """(scored shard, row) of every kept pair, in source order."""
        keep = ~(self.exact | self.near)
        return sorted(zip(self.part[keep].tolist(), self.row[keep].tolist()))


def exact_curation(spec: TrainShardsSpec) -> Reference:
    """The exact greedy over the whole scored output in one process (every row and embedding in memory)."""
    source = open_storage(spec.scored)
    markers = commit.list_markers(source)
    parts = sorted(i for i, m in markers.items() if m["samples_ok"])
    hist = merge(json.loads(source.read(layout.stats(i)))["clip_score"] for i in parts)
    # a valid spec has exactly one of the two (TrainShardsSpec.validate)
    threshold = (float(spec.min_score) if spec.min_score is not None
                 else quantile(hist, 1.0 - cast(float, spec.top_fraction)))
    cols: dict[str, list] = {"part": [], "row": [], "score": [], "hash": [], "emb": []}
    total = 0
    for i in parts:
        table = pq.read_table(io.BytesIO(source.read(layout.embed_files(i)["metadata"])))
        scores = table.column("clip_score").to_numpy()
        total += len(scores)
        chosen = np.nonzero(scores >= threshold)[0]
        cols["part"].append(np.full(len(chosen), i))
        cols["row"].append(chosen)
        cols["score"].append(scores[chosen])
        if spec.dedup_exact and "image_hash" not in table.column_names:
            raise ValueError(f"{spec.scored}: shard {i} has no image_hash column (the reference does not hash tars)")
        hashes = table.column("image_hash").to_pylist() if spec.dedup_exact else [""] * len(scores)
        cols["hash"].append(np.array([hashes[r] for r in chosen], "S32"))
        if spec.dedup_cosine is not None:
            cols["emb"].append(np.load(io.BytesIO(source.read(layout.embed_files(i)["img"])))[chosen])
    part, row, score, hashes = (np.concatenate(cols[k]) for k in ("part", "row", "score", "hash"))
    order = np.lexsort((row, part, -score))
    part, row, hashes = part[order], row[order], hashes[order]
    exact = np.zeros(len(order), bool)
    if spec.dedup_exact:
        exact[:] = True
        exact[np.unique(hashes, return_index=True)[1]] = False
    near = np.zeros(len(order), bool)
    emb = np.concatenate(cols["emb"])[order] if cols["emb"] else np.zeros((len(order), 0), np.float16)
    if spec.dedup_cosine is not None and len(order):
        rest = np.nonzero(~exact)[0]
        near[rest] = near_duplicates(emb[rest], spec.dedup_cosine)
    return Reference(threshold, part, row, emb, exact, near, total)


def finish_train_shards(output: Storage) -> None:
    """At the end of the job: ``sizes.json`` (what open_clip reads) and ``stats.json`` (per-stage counts)."""
    try:
        summary = json.loads(output.read(layout.SELECTION_PLAN))
    except FileNotFoundError:
        return  # a stage failed before the write stage was planned: the job ends failed, nothing to sum up
    output.write(layout.SIZES, json.dumps(summary["sizes"], indent=2, sort_keys=True).encode())
    stats = {k: v for k, v in summary.items() if k != "sizes"}
    output.write(layout.SELECTION_STATS, json.dumps(stats, indent=2, sort_keys=True).encode())
