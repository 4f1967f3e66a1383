"""A key repeated within a source tar never puts one sample's bytes under another's row.

The curation write stage finds a kept pair in its source tar by key. With two samples under one key it
returned the first's members for both rows, so a kept pair could carry a rejected pair's image. Given such a
tar, when it is read, then the first sample keeps the key and each later one is an error row (so a scored
output has one row per key), the write stage's readers (fast and tarfile's) take the first sample's members,
and the write stage refuses an image whose hash is not the one scored (outputs scored before).
"""
from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
import uuid
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.core import commit, layout
from clipbatch.core.config import Settings
from clipbatch.core.curation import task_input
from clipbatch.core.scores import histogram
from clipbatch.core.specs import ShardSpec, TrainShardsSpec
from clipbatch.core.storage import open_storage
from clipbatch.orchestration import Client
from clipbatch.sample_data import shape_image
from clipbatch.workers.fasttar import iter_selected
from clipbatch.workers.samples import content_hash, iter_raw_samples
from clipbatch.workers.writers import npy_bytes, write_tar
from tests.conftest import service_env
from tests.curation_data import run_stages


def png(colour: str, seed: int) -> bytes:
    buf = io.BytesIO()
    shape_image(colour, "square", random.Random(seed)).save(buf, "PNG")
    return buf.getvalue()


FIRST = {"png": png("red", 1), "txt": b"a red square"}
LATER = {"png": png("blue", 2), "txt": b"a blue square"}
SAMPLES = [("k0", {"png": png("green", 0), "txt": b"a green square"}), ("dup", FIRST),
           ("k1", {"png": png("green", 3), "txt": b"a green square"}), ("dup", LATER)]


def tar_bytes(samples=SAMPLES) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, samples)
    return buf.getvalue()


def test_a_repeated_key_is_an_error_row_and_the_first_sample_keeps_it():
    raws = list(iter_raw_samples(io.BytesIO(tar_bytes())))
    assert [(r.key, r.error is None) for r in raws] == [("k0", True), ("dup", True), ("k1", True), ("dup", False)]
    assert raws[1].members == FIRST and raws[3].error.startswith("duplicate key: 'dup' again at byte")


@pytest.mark.parametrize("compressed", [False, True], ids=["fast", "tarfile"])
def test_the_write_stages_readers_take_the_first_sample_under_a_key(compressed):
    data = tar_bytes()
    data = gzip.compress(data, mtime=0) if compressed else data  # a gzipped tar is tarfile's to read
    assert iter_selected(lambda: io.BytesIO(data), {"dup"}) == {"dup": FIRST}
    assert iter_selected(lambda: io.BytesIO(data), {"dup", "k1"}) == {"dup": FIRST, "k1": SAMPLES[2][1]}


def test_the_write_stage_refuses_an_image_that_is_not_the_one_scored(tmp_path):
    # given: a scored output made before a repeated key was an error row: both samples under 'dup' are rows,
    # each with its own image hash, and only the later one scores above the threshold
    source, scored = tmp_path / "src.tar", tmp_path / "scored"
    source.write_bytes(tar_bytes())
    keys = [k for k, _ in SAMPLES]
    scores = [0.1, 0.1, 0.1, 0.9]
    table = pa.table({"key": keys, "caption": [m["txt"].decode() for _, m in SAMPLES], "shard": [str(source)] * 4,
                      "clip_score": scores, "image_hash": [content_hash(m["png"]) for _, m in SAMPLES]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    names = layout.embed_files(0)
    files = {names["metadata"]: buf.getvalue(), names["img"]: npy_bytes(np.eye(4, 8)),
             names["stats"]: json.dumps({"clip_score": histogram(np.array(scores))}).encode()}
    commit.commit(open_storage(str(scored)), 0, "old", files, {"kind": "score", "input": str(source), "samples_ok": 4,
                                                              "samples_failed": 0, "modality": "pairs"})
    spec = TrainShardsSpec(str(scored), str(tmp_path / "train"), min_score=0.5)
    plan, _, kept, _ = run_stages(spec)
    assert [(r["key"], r["clip_score"]) for r in kept] == [("dup", 0.9)]

    # when / then: the write stage, which finds the first sample under 'dup', refuses to write it as the kept one
    from clipbatch.workers.training_shards import write_train_shard
    with pytest.raises(FileNotFoundError, match="not the image that was scored"):
        write_train_shard(ShardSpec("job", plan.base("write"), task_input(spec.output, "write", 0), spec), "a")


@pytest.mark.integration
def test_a_training_tar_carries_the_bytes_of_the_sample_that_was_scored(tmp_path, checkpoint, redis_url,
                                                                      start_worker):
    # given: a source tar holding key 'dup' twice, with different images and captions, and a real worker
    inputs, scored, train = tmp_path / "in", tmp_path / "scored", tmp_path / "train"
    inputs.mkdir()
    (inputs / "00000.tar").write_bytes(tar_bytes())
    queue = f"dup-{uuid.uuid4().hex[:8]}"
    start_worker(queue, service_env(redis_url))
    client = Client(replace(Settings.from_env(), broker_url=redis_url))

    # when: it is scored, and every scored pair is kept for training shards
    assert client.submit_score(str(inputs), str(scored), "clipbatch-tiny", str(checkpoint),
                               queue=queue).wait(timeout_s=300)["state"] == "succeeded"
    job = client.submit(TrainShardsSpec(str(scored), str(train), min_score=-1.0, queue=queue))
    assert job.wait(timeout_s=300)["state"] == "succeeded"

    # then: the later 'dup' is an error row of the scored output, and the training tar holds each key once,
    # 'dup' with the bytes of the sample that was scored under it
    written = {}
    for path in sorted(train.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            stem = name[:-len(".json")]
            key = json.loads(members[name])["key"]
            assert key not in written
            written[key] = {"png": members[f"{stem}.png"], "txt": members[f"{stem}.txt"]}
    assert sorted(written) == ["dup", "k0", "k1"] and written["dup"] == FIRST
    errors = pq.read_table(scored / "errors" / "errors_0.parquet").to_pylist()
    assert [e["key"] for e in errors] == ["dup"] and errors[0]["reason"].startswith("duplicate key")
