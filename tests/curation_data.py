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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.core import commit, layout
from clipbatch.core.scores import histogram
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


def plant(pairs: int, dim: int = 512, threshold: float = 0.95, margin: float = 0.005, seed: int = 0,
          group_share: float = 0.08, boundary_share: float = 0.05, exact_share: float = 0.01) -> Planted:
    rng = np.random.default_rng(seed)
    topics = _unit(rng.normal(size=(max(4, pairs // 1000), dim)))
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


def write_scored(root: Path, planted: Planted, shards: int, hashes: bool = True) -> tuple[str, dict[str, tuple[int, int]]]:
    """Commit ``planted`` as a scored output of ``shards`` shards under ``root``; returns its URI and
    each key's (scored shard, row)."""
    (root / "src").mkdir(parents=True, exist_ok=True)
    scored = open_storage(str(root / "scored"))
    where: dict[str, tuple[int, int]] = {}
    for i, rows in enumerate(np.array_split(np.arange(len(planted.scores)), shards)):
        keys = [f"{i:05d}{r:07d}" for r in range(len(rows))]
        where.update({k: (i, r) for r, k in enumerate(keys)})
        images = [image_bytes(planted.image[r]) for r in rows]
        tar = root / "src" / f"{i:05d}.tar"
        with open(tar, "wb") as f:
            write_tar(f, [(k, {"jpg": b, "txt": f"caption {k}".encode()}) for k, b in zip(keys, images)])
        columns = {"key": keys, "caption": [f"caption {k}" for k in keys], "shard": [str(tar)] * len(rows),
                   "clip_score": planted.scores[rows]}
        if hashes:
            columns["image_hash"] = [content_hash(b) for b in images]
        buf = io.BytesIO()
        pq.write_table(pa.table(columns), buf)
        files = {layout.embed_files(i)["metadata"]: buf.getvalue(), layout.embed_files(i)["img"]: npy_bytes(planted.emb[rows]),
                 layout.stats(i): json.dumps({"clip_score": histogram(planted.scores[rows])}).encode()}
        record = {"kind": "score", "input": str(tar), "samples_ok": len(rows), "samples_failed": 0, "modality": "pairs",
                  "input_etag": None, "input_size": tar.stat().st_size}
        commit.commit(scored, i, f"synthetic{i}", files, record)
    return scored.uri, where
