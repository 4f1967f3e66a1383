"""Synthetic committed embed outputs, built directly (no model): for cost curves at 10^3..10^5 shards.

``build(input, output, n)`` writes ``n`` input tars (one real sample each: a tiny PNG and its
caption) and, for each, the output a finished embed job leaves: img/text fp16 npy, metadata and
errors parquet (the real writers' bytes), ``stats/{i}.json`` with a real score histogram, and the
marker ``_commits/{i}.json`` with the fields a worker's commit writes (``tasks/lifecycle.py``'s
record plus ``core/commit.py``'s index, attempt and files). The markers name each tar's size and
ETag as the input listing reports them, so a resubmit sees every shard as committed and unchanged.

Only the markers, stats and arrays differ per shard: the parquet bytes are one template (the bench
never reads them). Files go straight to a folder, or to S3 from a pool of threads on one client.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import boto3
import numpy as np

from clipbatch.core import layout
from clipbatch.core.results import ShardResult
from clipbatch.core.scores import histogram
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.core.storage import is_s3, join, open_storage, s3_client
from clipbatch.orchestration.planner import normalise
from clipbatch.workers import writers

MODEL = "clipbatch-tiny"  # the project's tiny config: a worker could run these shards for real
SAMPLES = 2  # samples per synthetic shard (one image, captioned twice under two keys)
DIM = 8  # embedding width of the synthetic arrays
S3_THREADS = 16  # requests in flight to S3; a folder is written from one thread (it is CPU-bound here)
COMMITTED_AGO_NS = 3600 * 10**9  # a folder's files are dated an hour back: committed before, not just now
_CHUNK = 500  # shards per task of a builder's pool
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


@dataclass(frozen=True)
class Fixture:
    spec: JobSpec  # normalised: the fingerprint every synthetic marker carries
    input: str  # folder or s3:// prefix of the input tars
    output: str
    shards: int  # committed shards, indices 0..shards-1


def job_spec(input: str, output: str, **options: Any) -> JobSpec:
    """The embed job the synthetic output belongs to (the tiny model, random init), normalised."""
    return normalise(JobSpec(input, output, ModelSpec(MODEL), **options))


def input_name(index: int) -> str:
    """Zero-padded past 10^6, so the sorted listing puts tar ``i`` at position ``i``."""
    return f"{index:07d}.tar"


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


_PNG = _png()


def tar_bytes(index: int) -> bytes:
    """A real webdataset tar of SAMPLES samples; its keys name the shard, so every tar's bytes differ."""
    buf = io.BytesIO()
    samples = [(f"{index:07d}_{k}", {"png": _PNG, "txt": f"a red square {index} {k}".encode()})
               for k in range(SAMPLES)]
    writers.write_tar(buf, samples)
    return buf.getvalue()


def _templates() -> dict[str, bytes]:
    rows = [{"key": f"0000000_{k}", "caption": f"a red square 0 {k}", "shard": "0000000.tar"} for k in range(SAMPLES)]
    return {"metadata": writers.metadata_bytes(rows, [None] * SAMPLES, {"clip_score": [0.25] * SAMPLES}),
            "errors": writers.errors_bytes([])}


_TEMPLATES = _templates()


def shard_files(index: int, input_uri: str, job_id: str, attempt: str) -> dict[str, bytes]:
    """One committed shard's output files by key, as ``workers/embed.py`` names them."""
    rng = np.random.default_rng(index)
    names = layout.embed_files(index)
    img, txt = (rng.standard_normal((SAMPLES, DIM)).astype(np.float16) for _ in range(2))
    scores = rng.uniform(0.1, 0.4, SAMPLES)
    stats = {"shard": input_uri, "index": index, "job_id": job_id, "attempt": attempt, "model": MODEL,
             "modality": "pairs", "device": "cpu", "input_bytes": 0, "samples_total": SAMPLES,
             "samples_ok": SAMPLES, "samples_failed": 0, "captions_embedded": SAMPLES, "error_reasons": {},
             "seconds": {"total": 0.01, "waiting_for_decode": 0.0, "forward": 0.01, "serialise": 0.0},
             "samples_per_s": SAMPLES / 0.01, "images_decoded_on_device": 0, "batch_size": SAMPLES,
             "forward_batch_limit": None, "cpu_forward_batches_by_threads": {"1": 1},
             "clip_score": histogram(scores)}
    return {names["img"]: writers.npy_bytes(img), names["text"]: writers.npy_bytes(txt),
            names["metadata"]: _TEMPLATES["metadata"], names["errors"]: _TEMPLATES["errors"],
            names["stats"]: writers.json_bytes(stats)}


def marker(spec: JobSpec, index: int, input_uri: str, size: int, etag: str, job_id: str, attempt: str,
           files: list[str]) -> dict[str, Any]:
    """The marker a winning commit writes: the lifecycle's record, then the commit's own fields."""
    return {"job_id": job_id, "kind": spec.kind, "input": input_uri, "input_size": size, "input_etag": etag,
            "samples_ok": SAMPLES, "samples_failed": 0, "committed_at": time.time(), **spec.marker_fields(),
            "retired": [], "index": index, "attempt": attempt, "files": sorted(files)}


def compute(shard: Any, attempt: str) -> ShardResult:
    """A stand-in for the model: a shard's synthetic output, for a real ``run_shard`` to commit."""
    parent, _, name = shard.input.rpartition("/")
    info = open_storage(parent).info(name)
    files = shard_files(shard.index, shard.input, shard.job_id, attempt)
    return ShardResult(files, SAMPLES, 0, info.size, info.etag, record={"retired": []})


class _Writer:
    """Writes keys under one root: plain files in a folder, or put_object on one shared S3 client
    (boto3's environment's endpoint, or ``endpoint``: a builder may bypass a counting proxy)."""

    def __init__(self, uri: str, endpoint: str | None = None) -> None:
        self.storage = open_storage(uri)
        self.s3 = is_s3(uri)
        self.client = None  # a client is thread-safe: one for every thread
        if self.s3:
            self.client = boto3.client("s3", endpoint_url=endpoint) if endpoint else s3_client()
        self.root = None if self.s3 else str(self.storage.root)
        self.threads = S3_THREADS if self.s3 else 1
        self.mtime_ns = time.time_ns() - COMMITTED_AGO_NS

    def put(self, key: str, data: bytes) -> str:
        """Write one object; return the ETag the input listing will report for it."""
        if self.s3:
            self.client.put_object(Bucket=self.storage.bucket, Key=self.storage._key(key), Body=data)
            return hashlib.md5(data).hexdigest()
        path = f"{self.root}/{key}"
        try:
            fd = os.open(path, _CREATE, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, _CREATE, 0o644)
        try:
            os.write(fd, data)
            os.utime(fd, ns=(self.mtime_ns, self.mtime_ns))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return f"{st.st_mtime_ns:x}-{st.st_size:x}"  # what LocalStorage.info reports


def _run(fn: Callable[[range], None], start: int, count: int, threads: int) -> None:
    """``fn`` over ``start..start+count-1`` in runs, on ``threads`` threads."""
    if threads == 1:
        return fn(range(start, start + count))
    step = max(1, min(_CHUNK, -(-count // (threads * 4))))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, [range(s, min(s + step, start + count)) for s in range(start, start + count, step)]))


def add_inputs(input: str, start: int, count: int, threads: int | None = None,
               endpoint: str | None = None) -> dict[int, tuple[str, int, str]]:
    """Write input tars ``start..start+count-1``; returns index -> (uri, size, etag) as the listing sees it."""
    writer, uri = _Writer(input, endpoint), open_storage(input).uri
    threads = threads or writer.threads
    found: dict[int, tuple[str, int, str]] = {}

    def write(indices: range) -> None:
        for i in indices:
            data = tar_bytes(i)
            found[i] = (join(uri, input_name(i)), len(data), writer.put(input_name(i), data))

    _run(write, start, count, threads)
    return found


def commit_shards(spec: JobSpec, inputs: dict[int, tuple[str, int, str]], threads: int | None = None,
                  endpoint: str | None = None) -> None:
    """Write the finished commit of each input (contiguous indices): its files in place, then its marker."""
    writer, job_id = _Writer(spec.output, endpoint), uuid.uuid4().hex[:16]
    threads = threads or writer.threads

    def write(indices: range) -> None:
        for i in indices:
            uri, size, etag = inputs[i]
            attempt = uuid.uuid4().hex
            files = shard_files(i, uri, job_id, attempt)
            for key, data in files.items():
                writer.put(key, data)
            record = marker(spec, i, uri, size, etag, job_id, attempt, list(files))
            writer.put(layout.marker(i), json.dumps(record, sort_keys=True).encode())

    if inputs:
        _run(write, min(inputs), len(inputs), threads)


def build(input: str, output: str, shards: int, threads: int | None = None, endpoint: str | None = None) -> Fixture:
    """A committed output of ``shards`` input tars, as a finished embed job over ``input`` leaves it."""
    if not is_s3(input):
        Path(input).mkdir(parents=True, exist_ok=True)
    if not is_s3(output):
        for folder in ("img_emb", "text_emb", "metadata", "errors", "stats", layout.MARKER_DIR):
            (Path(output) / folder).mkdir(parents=True, exist_ok=True)
    spec = job_spec(input, output)
    commit_shards(spec, add_inputs(input, 0, shards, threads, endpoint), threads, endpoint)
    return Fixture(spec, input, output, shards)
