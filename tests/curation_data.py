"""Synthetic scored outputs with planted duplicates, written directly (no model), for the curation
tests and bench/curation.py.

Rows are drawn around topic centres (so k-means has structure to find). Planted near-duplicate
groups: a base embedding and perturbed copies at cosine ``threshold + margin`` (duplicates of the
base) and ``threshold - margin`` (not duplicates); a share of the bases sits half-way between two
topics, on a cluster boundary. Exact duplicates share a row's image bytes and embedding. Rows are
shuffled over the shards. Each shard is committed with the real commit protocol: a source tar
(tiny fake image bytes and a caption per sample), fp16 image embeddings, metadata (key, caption,
shard, clip_score and, unless ``hashes=False``, image_hash) and stats with a real score histogram.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.core import commit, layout
from clipbatch.core.curation import CurationPlan, load_parts, plan_curation, plan_write, read_rows
from clipbatch.core.scores import histogram
from clipbatch.core.specs import TrainShardsSpec
from clipbatch.core.storage import open_storage
from clipbatch.workers.samples import content_hash
from clipbatch.workers.writers import npy_bytes, write_tar

GROUP = (+1, +1, -1)  # copies per planted group: above, above, below the threshold


@dataclass
class Planted:
    emb: np.ndarray  # fp16, rows in output order
    scores: np.ndarray
    image: np.ndarray  # image id per row: equal ids, equal bytes
    groups: int
    boundary_groups: int


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _copies(base: np.ndarray, cosines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly ``cosines`` from each ``base`` row (a random orthogonal direction)."""
    u = rng.normal(size=base.shape)
    u -= (u * base).sum(-1, keepdims=True) * base
    u = _unit(u)
    return cosines[..., None] * base + np.sqrt(1 - cosines[..., None] ** 2) * u


def topics_for(pairs: int, dim: int, seed: int = 0) -> np.ndarray:
    """Topic centres: one per 1,000 pairs."""
    return _unit(np.random.default_rng(seed).normal(size=(max(4, pairs // 1000), dim)))


def plant(pairs: int, dim: int = 512, threshold: float = 0.95, margin: float = 0.005, seed: int = 0,
          group_share: float = 0.08, boundary_share: float = 0.05, exact_share: float = 0.01,
          topics: np.ndarray | None = None) -> Planted:
    rng = np.random.default_rng(seed)
    topics = topics_for(pairs, dim, seed) if topics is None else topics
    n_groups = int(pairs * group_share / (1 + len(GROUP)))
    n_exact = int(pairs * exact_share)
    n_plain = pairs - n_groups * (1 + len(GROUP)) - n_exact
    which = rng.integers(len(topics), size=n_plain)
    plain = _unit(topics[which] + rng.normal(size=(n_plain, dim)) * 1.2 / np.sqrt(dim))
    boundary = int(n_groups * boundary_share)
    t1, t2 = rng.integers(len(topics), size=(2, n_groups))
    mix = np.where(np.arange(n_groups)[:, None] < boundary, topics[t1] + topics[t2], topics[t1] * 1.0)
    bases = _unit(mix + rng.normal(size=(n_groups, dim)) * 0.8 / np.sqrt(dim))
    cosines = threshold + margin * np.array(GROUP, float)
    copies = _copies(np.repeat(bases[:, None], len(GROUP), 1), np.broadcast_to(cosines, (n_groups, len(GROUP))), rng)
    emb = np.concatenate([plain, bases, copies.reshape(-1, dim)])
    image = np.arange(len(emb))
    source = rng.integers(len(emb), size=n_exact)  # exact duplicates: another row's bytes and embedding
    emb, image = np.concatenate([emb, emb[source]]), np.concatenate([image, image[source]])
    order = rng.permutation(len(emb))
    scores = rng.uniform(0.10, 0.40, size=len(emb)).astype(np.float32)
    return Planted(emb[order].astype(np.float16), scores, image[order], n_groups, boundary)


def image_bytes(image_id: int) -> bytes:
    return b"\xff\xd8fake-jpeg-" + str(int(image_id)).encode()


def write_scored(root: Path, planted: Planted, shards: int,
                 hashes: bool = True) -> tuple[str, dict[str, tuple[int, int]]]:
    """Commit ``planted`` as a scored output of ``shards`` shards under ``root``; returns its URI and
    each key's (scored shard, row)."""
    where: dict[str, tuple[int, int]] = {}
    for i, rows in enumerate(np.array_split(np.arange(len(planted.scores)), shards)):
        keys = write_shard(root, i, planted.emb[rows], planted.scores[rows], planted.image[rows], hashes)
        where.update({k: (i, r) for r, k in enumerate(keys)})
    return str(root / "scored"), where


def write_shard(root: Path, i: int, emb: np.ndarray, scores: np.ndarray, image: np.ndarray,
                hashes: bool = True, attempt: str | None = None) -> list[str]:
    """Commit scored shard ``i`` (and write its source tar) as ``attempt``; returns its keys in row order."""
    (root / "src").mkdir(parents=True, exist_ok=True)
    keys = [f"{i:05d}{r:07d}" for r in range(len(scores))]
    images = [image_bytes(n) for n in image]
    tar = root / "src" / f"{i:05d}.tar"
    with open(tar, "wb") as f:
        write_tar(f, [(k, {"jpg": b, "txt": f"caption {k}".encode()}) for k, b in zip(keys, images)])
    columns = {"key": keys, "caption": [f"caption {k}" for k in keys], "shard": [str(tar)] * len(keys),
               "clip_score": scores}
    if hashes:
        columns["image_hash"] = [content_hash(b) for b in images]
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    names = layout.embed_files(i)
    files = {names["metadata"]: buf.getvalue(), names["img"]: npy_bytes(emb),
             names["stats"]: json.dumps({"clip_score": histogram(scores)}).encode()}
    record = {"kind": "score", "input": str(tar), "samples_ok": len(keys), "samples_failed": 0, "modality": "pairs",
              "input_etag": None, "input_size": tar.stat().st_size}
    commit.commit(open_storage(str(root / "scored")), i, attempt or f"synthetic{i}", files, record)
    return keys


def assigned_clusters(output: Path) -> dict[tuple[int, int], int]:
    """(scored shard, row) -> the cluster the assign stage put it in, from its files."""
    found = {}
    for path in (output / layout.CURATION_DIR / "assign").glob("*/*.npy"):
        rows = np.load(path)
        found.update({(int(p), int(r)): int(c) for p, r, c in zip(rows["part"], rows["row"], rows["cluster"])})
    return found


def straddling(ref, clusters: dict[tuple[int, int], int], cosine: float) -> int:
    """How many rows the exact greedy drops have no kept row at ``cosine`` or more in their own cluster
    (their duplicates straddle a cluster boundary): what per-cluster dedup cannot see."""
    emb = ref.embeddings.astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keep = ~(ref.exact | ref.near)
    kept_idx, dropped_idx = np.nonzero(keep)[0], np.nonzero(ref.near)[0]
    home = np.array([clusters[(p, r)] for p, r in zip(ref.part.tolist(), ref.row.tolist())])
    count = 0
    for i in range(0, len(dropped_idx), 1024):
        d = dropped_idx[i:i + 1024]
        near = (emb[d] @ emb[kept_idx].T) >= cosine
        same = home[d][:, None] == home[kept_idx][None, :]
        count += int((~(near & same).any(axis=1)).sum())
    return count


def run_stages(spec: TrainShardsSpec) -> tuple[CurationPlan, dict[int, dict], list[dict], set[str]]:
    """Every stage's compute in this process, in order, on ``spec.output`` (the tasks' code without Redis or
    workers): the plan, each task's marker record, the tars' selected rows in order, and the keys the dedup
    stage alone keeps (before the boundary pass)."""
    from clipbatch.workers.boundary import boundary_pass
    from clipbatch.workers.curation import assign_part, dedup_group, train_centroids
    from clipbatch.workers.training_shards import selection

    out = open_storage(spec.output)
    plan, _ = plan_curation(spec, out)
    markers: dict[int, dict] = {}

    def run(index: int, result: tuple[dict[str, bytes], dict]) -> None:
        for key, data in result[0].items():
            out.write(key, data)
        markers[index] = result[1]

    run(0, train_centroids(plan, out))
    for a, part in enumerate(load_parts(out)):
        run(plan.base("assign") + a, assign_part(plan, out, part))
    for g in range(plan.groups):
        run(plan.base("dedup") + g, dedup_group(plan, out, g))
    scored = open_storage(plan.scored)
    pass_one = set()
    for g in range(plan.groups):
        for p in markers[plan.base("dedup") + g]["kept_parts"]:
            meta = pq.read_table(io.BytesIO(scored.read(layout.embed_files(int(p))["metadata"])), columns=["key"])
            keys = meta.column("key").to_pylist()
            pass_one.update(keys[r] for r in read_rows(out, layout.kept(g, int(p))).tolist())
    for g in range(plan.boundary):
        run(plan.base("boundary") + g, boundary_pass(plan, out, g))
    kept = [row for j in range(plan_write(out, plan, markers)) for row in selection(out, j)]
    return plan, markers, kept, pass_one


def recall_precision(ref: Any, kept: set[tuple[int, int]], cosine: float = 0.95) -> dict[str, Any]:
    """Of the selected pairs (``ref``: the exact greedy's curation), the share of those the exact greedy
    removes that ``kept`` (scored shard, row) also removes, and the share of the pairs ``kept`` removes
    that have a kept pair at cosine >= the threshold."""
    order = {pr: k for k, pr in enumerate(zip(ref.part.tolist(), ref.row.tolist()))}
    removed_exact, removed = set(order) - set(ref.kept), set(order) - kept
    emb = ref.embeddings.astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keep = emb[[order[pr] for pr in sorted(kept)]]
    dropped = np.array([order[pr] for pr in sorted(removed)])
    closest = np.concatenate([(emb[dropped[i:i + 1024]] @ keep.T).max(axis=1) for i in range(0, len(dropped), 1024)]
                             or [np.zeros(0)])
    return {"selected": len(order), "pairs_exact_removes": len(removed_exact), "pairs_workers_remove": len(removed),
            "recall": len(removed & removed_exact) / max(1, len(removed_exact)),
            "precision": float((closest >= cosine).mean()) if len(closest) else 1.0}
