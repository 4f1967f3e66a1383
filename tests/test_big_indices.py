"""Shard indices past 99,999: five-digit names grow a digit (``_commits/123456.json``), and every
reader of the output still parses, orders and pairs them by number.

Given an output whose committed shards sit at 0, 99,998, 99,999, 100,000 and 123,456 (written
directly, as a worker's commit leaves them, with the real model's width), when a real worker
runs one new input shard, then it lands past the end at 123,457, its marker parses, ``status``
and the report count all six shards, and embedding-reader yields every row with its own metadata.
"""
from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipbatch.core import commit, layout, marker_index
from clipbatch.core.scores import histogram
from clipbatch.core.storage import Storage, open_storage
from clipbatch.orchestration.planner import plan
from clipbatch.workers import writers
from tests import synthetic
from tests.conftest import run_cli, service_env

pytestmark = pytest.mark.integration

COMMITTED = {0: "s0.tar", 99_998: "s1.tar", 99_999: "s2.tar", 100_000: "s3.tar", 123_456: "s4.tar"}
NEW = "new.tar"  # sorts first: its position (0) is taken, so it goes past the end
DIM = 64  # clipbatch-tiny's embed_dim: the new shard's rows and the synthetic ones share one width


def commit_synthetic(storage: Storage, spec, i: int, uri: str, size: int, etag: str) -> None:
    """Shard ``i``'s files in place and its marker, as a worker's winning commit leaves them."""
    rng = np.random.default_rng(i)
    names, attempt = layout.embed_files(i), uuid.uuid4().hex
    img, txt = (rng.standard_normal((synthetic.SAMPLES, DIM)) for _ in range(2))
    img, txt = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (img, txt))
    scores = (img * txt).sum(axis=1)
    rows = [{"key": f"{i:07d}_{k}", "caption": f"a red square {i} {k}", "shard": uri} for k in range(synthetic.SAMPLES)]
    stats = {"shard": uri, "index": i, "attempt": attempt, "samples_ok": synthetic.SAMPLES, "samples_failed": 0,
             "error_reasons": {}, "modality": "pairs", "clip_score": histogram(scores)}
    files = {names["img"]: writers.npy_bytes(img), names["text"]: writers.npy_bytes(txt),
             names["metadata"]: writers.metadata_bytes(rows, [None] * len(rows), {"clip_score": scores}),
             names["errors"]: writers.errors_bytes([]), names["stats"]: writers.json_bytes(stats)}
    for key, data in files.items():
        storage.write(key, data)
    record = synthetic.marker(spec, i, uri, size, etag, "synthetic", attempt, list(files))
    assert storage.create_exclusive(layout.marker(i), json.dumps(record, sort_keys=True).encode())


def our_rows(storage: Storage, indices: list[int]) -> dict[str, np.ndarray]:
    """Each row's image embedding by its key, read shard by shard by index (no listing involved)."""
    rows = {}
    for i in indices:
        names = layout.embed_files(i)
        vectors = np.load(io.BytesIO(storage.read(names["img"])))
        keys = pq.read_table(io.BytesIO(storage.read(names["metadata"]))).column("key").to_pylist()
        assert len(keys) == len(vectors)
        rows.update(zip(keys, vectors))
    return rows


def test_a_job_past_index_99999_plans_commits_reports_and_reads_in_order(redis_url, tmp_path, start_worker):
    # given committed shards at 0, 99,998, 99,999, 100,000 and 123,456, and one new input shard
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    spec = synthetic.job_spec(str(inputs), str(out))
    storage, folder = open_storage(str(out)), open_storage(str(inputs))
    for i, name in COMMITTED.items():
        folder.write(name, synthetic.tar_bytes(i))
        info = folder.info(name)
        commit_synthetic(storage, spec, i, f"{folder.uri}/{name}", info.size, info.etag)
    folder.write(NEW, synthetic.tar_bytes(777))
    assert layout.marker(123_456) == "_commits/123456.json" and layout.marker_index("_commits/123456.json") == 123_456

    # when it is planned: the five are committed and the new shard goes past the end
    planned = plan(spec)
    assert sorted(planned.committed) == sorted(COMMITTED) and planned.todo == [123_457]
    assert sorted(marker_index.read_markers(storage)) == sorted(commit.list_markers(storage)) == sorted(COMMITTED)

    # and a real worker runs it through the CLI
    queue = f"big-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_CACHE_DIR=str(tmp_path / "cache"))
    start_worker(queue, env)
    done = run_cli("submit", "embed", "--input", str(inputs), "--output", str(out), "--model", synthetic.MODEL,
                   "--batch-size", "8", "--queue", queue, "--wait", "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)

    # then status counts six shards, five skipped, and the new one committed at 123,457
    assert status["state"] == "succeeded", status
    assert (status["shards_total"], status["shards_done"], status["shards_skipped"]) == (6, 6, 5)
    assert status["samples_done"] == 6 * synthetic.SAMPLES
    shown = run_cli("status", status["job_id"], env=env)
    assert shown.returncode == 0 and "6/6 done" in shown.stdout, shown.stdout + shown.stderr
    every = sorted([*COMMITTED, 123_457])
    assert storage.exists("_commits/123457.json")
    markers = commit.list_markers(storage)
    assert sorted(markers) == every and markers[123_457]["input"].endswith(NEW)
    assert marker_index.refresh(storage) == markers
    # and the report merged every shard's scores
    summary = json.loads(storage.read(layout.SUMMARY))
    assert (summary["shards"], summary["count"]) == (6, 6 * synthetic.SAMPLES), summary
    # and embedding-reader yields every row, each with its own metadata, files in one order for both folders
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["key"])
    assert reader.count == 6 * synthetic.SAMPLES
    embeddings, keys = [], []
    for emb, meta in reader(batch_size=5, show_progress=False):
        embeddings.append(emb)
        keys.extend(meta["key"])
    ours = our_rows(storage, every)
    assert sorted(keys) == sorted(ours)
    for emb, key in zip(np.concatenate(embeddings), keys):
        assert np.array_equal(emb, ours[key].astype(emb.dtype)), key
