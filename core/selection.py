"""Plan a training-shards job: select pairs of a scored output, drop near-duplicates, and cut
the result into output shards (one selection file per shard task).

Selection by ``--min-score``, or by ``--top-fraction`` whose threshold is read off the merged
score histogram (no global sort). Near-duplicate removal is exact and greedy in descending
score order: a pair is dropped when its image embedding has cosine >= ``--dedup-cosine`` with
a pair already kept. It runs on the producer in blocks of ``DEDUP_BLOCK`` rows, O(N x kept)
time and O(kept x dim) memory: fine up to a few million pairs on one machine; beyond that, an
approximate index (autofaiss) per bucket of a coarse quantiser would replace it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.core import commit, layout
from clipbatch.core.scores import merge, quantile
from clipbatch.core.storage import Storage, join, open_storage
from clipbatch.core.specs import SpecError, TrainShardsSpec

DEDUP_BLOCK = 4096


@dataclass
class TrainPlan:
    selections: list[str]  # URI of each output shard's selection file
    summary: dict[str, Any]


def _scored_rows(source: Storage, markers: dict[int, dict]) -> pa.Table:
    tables = []
    for i in sorted(markers):
        if not markers[i]["samples_ok"]:  # a shard with no embedded pair has no metadata file
            continue
        table = pq.read_table(io.BytesIO(source.read(layout.embed_files(i)["metadata"])))
        if "clip_score" not in table.column_names:
            raise SpecError("scored", f"{source.uri} has no clip_score column; run a score job on it first")
        table = table.select(["key", "shard", "clip_score"])
        tables.append(table.append_column("part", pa.array(np.full(len(table), i, np.int64)))
                      .append_column("row", pa.array(np.arange(len(table), dtype=np.int64))))
    if not tables:
        raise SpecError("scored", f"{source.uri} holds no embedded pairs (every sample was an error)")
    return pa.concat_tables(tables)


def _threshold(spec: TrainShardsSpec, source: Storage, markers: dict[int, dict]) -> float:
    if spec.min_score is not None:
        return float(spec.min_score)
    stats = [json.loads(source.read(layout.stats(i))) for i in sorted(markers)]
    return quantile(merge(s["clip_score"] for s in stats), 1.0 - spec.top_fraction)


def near_duplicates(embeddings: np.ndarray, cosine: float, block: int = DEDUP_BLOCK) -> np.ndarray:
    """Greedy exact dedup in the given order: True for rows too close to an earlier kept row."""
    emb = embeddings.astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    dropped = np.zeros(len(emb), dtype=bool)
    kept = np.empty((0, emb.shape[1]), np.float32)
    for start in range(0, len(emb), block):
        chunk = emb[start:start + block]
        dup = (chunk @ kept.T).max(axis=1) >= cosine if len(kept) else np.zeros(len(chunk), bool)
        within = chunk @ chunk.T
        kept_here: list[int] = []
        for j in range(len(chunk)):
            if not dup[j] and kept_here and within[j, kept_here].max() >= cosine:
                dup[j] = True
            if not dup[j]:
                kept_here.append(j)
        dropped[start:start + len(chunk)] = dup
        kept = np.concatenate([kept, chunk[kept_here]])
    return dropped


def plan_train_shards(spec: TrainShardsSpec, output: Storage) -> TrainPlan:
    """Select and dedup, write one selection file per output shard plus ``_selection/plan.json``."""
    source = open_storage(spec.scored)
    markers = commit.list_markers(source)
    if not markers:
        raise SpecError("scored", f"{spec.scored} holds no committed shards")
    alone = sorted({m.get("modality", "pairs") for m in markers.values()} - {"pairs"})
    if alone:
        raise SpecError("scored", f"{spec.scored} holds {alone[0]}-only embeddings (--modality {alone[0]}), no "
                                  "pairs or clip_score; training shards are cut from a pairs output")
    rows = _scored_rows(source, markers)
    scores = rows.column("clip_score").to_numpy()
    threshold = _threshold(spec, source, markers)
    chosen = np.nonzero(scores >= threshold)[0]
    keys = rows.column("key").to_pylist()
    # Highest score first, so the best of a group of duplicates is the one kept; ties by key.
    chosen = sorted(chosen, key=lambda r: (-scores[r], keys[r]))
    duplicate = np.zeros(len(chosen), bool)
    if spec.dedup_cosine is not None and chosen:
        parts, offsets = rows.column("part").to_numpy(), rows.column("row").to_numpy()
        arrays = {i: np.load(io.BytesIO(source.read(layout.embed_files(i)["img"]))) for i in set(parts[chosen])}
        duplicate = near_duplicates(np.stack([arrays[parts[r]][offsets[r]] for r in chosen]), spec.dedup_cosine)
    kept = sorted(r for r, d in zip(chosen, duplicate) if not d)  # back to source order: few tars per shard
    table = rows.take(pa.array(kept, pa.int64())).select(["shard", "key", "clip_score"])
    starts = range(0, len(kept), spec.samples_per_shard)
    sizes = [min(spec.samples_per_shard, len(kept) - start) for start in starts]
    summary = {
        "scored": spec.scored, "threshold": threshold, "min_score": spec.min_score, "top_fraction": spec.top_fraction,
        "dedup_cosine": spec.dedup_cosine, "samples_per_shard": spec.samples_per_shard,
        "total": len(scores), "kept": len(kept), "dropped_by_score": len(scores) - len(chosen),
        "dropped_as_duplicate": int(duplicate.sum()),
        "sizes": {layout.training_shard(j): n for j, n in enumerate(sizes)},
    }
    _check_same_plan(output, summary)
    selections = []
    for j, start in enumerate(starts):
        buf = io.BytesIO()
        pq.write_table(table.slice(start, spec.samples_per_shard), buf)
        output.write(layout.selection(j), buf.getvalue())
        selections.append(join(output.uri, layout.selection(j)))
    output.write(layout.SELECTION_PLAN, json.dumps(summary, indent=2, sort_keys=True).encode())
    return TrainPlan(selections, summary)


def _check_same_plan(output: Storage, summary: dict[str, Any]) -> None:
    try:
        previous = json.loads(output.read(layout.SELECTION_PLAN))
    except FileNotFoundError:
        return
    if previous != summary and commit.list_markers(output):
        raise SpecError("output", f"{output.uri} already holds shards of a different selection; use a new output")


def finish_train_shards(output: Storage) -> None:
    """At the end of the job: ``sizes.json`` (what open_clip reads) and ``stats.json``."""
    summary = json.loads(output.read(layout.SELECTION_PLAN))
    output.write(layout.SIZES, json.dumps(summary["sizes"], indent=2, sort_keys=True).encode())
    stats = {k: v for k, v in summary.items() if k != "sizes"}
    output.write(layout.SELECTION_STATS, json.dumps(stats, indent=2, sort_keys=True).encode())
