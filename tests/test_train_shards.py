"""Curated training shards from a scored output: selection, dedup, webdataset-readable tars."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from clipbatch.core.selection import near_duplicates
from tests.conftest import run_cli, service_env
from tests.test_e2e_s3 import upload_shards, s3_bytes, samples_by_key


def test_near_duplicates_is_greedy_and_exact():
    a, b, c = np.eye(3, 4, dtype=np.float32)
    close_to_a = a + 0.05 * b
    dropped = near_duplicates(np.stack([a, close_to_a, b, c, a]), cosine=0.95, block=2)
    assert dropped.tolist() == [False, True, False, False, True]


@pytest.mark.integration
def test_shards_from_a_scored_output(redis_url, bucket, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a scored output (with embeddings) of three shards of real photos
    folder, built = photo_shards
    upload_shards(folder, bucket, "in")
    queue = f"train-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    start_worker(queue, env)
    scored = run_cli("submit", "score", "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/scores",
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--wait", "--json",
                     env=env)
    assert scored.returncode == 0, scored.stderr

    def shards(output: str):
        return run_cli("submit", "shards", "--scored", f"s3://{bucket}/scores", "--output", output,
                       "--top-fraction", "0.5", "--dedup-cosine", "0.98", "--samples-per-shard", "8",
                       "--queue", queue, "--wait", "--json", env=env)

    # when: the top half is kept, near-duplicates dropped, and cut into shards of 8
    result = shards(f"s3://{bucket}/train")

    # then: the threshold is numpy's median of all scores (within histogram precision) and counts add up
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded" and status["kind"] == "shards"
    scores = {}
    for i in range(3):
        for row in pq.read_table(io.BytesIO(s3_bytes(bucket, f"scores/metadata/metadata_{i}.parquet"))).to_pylist():
            scores[row["key"]] = row["clip_score"]
    stats = json.loads(s3_bytes(bucket, "train/stats.json"))
    assert abs(stats["threshold"] - np.quantile(list(scores.values()), 0.5)) <= 0.001
    assert stats["total"] == len(scores) == built["good"]
    assert stats["kept"] + stats["dropped_by_score"] + stats["dropped_as_duplicate"] == stats["total"]
    assert stats["kept"] > 0

    # and webdataset reads the shards with the right keys, counts equal to sizes.json, original bytes
    sizes = json.loads(s3_bytes(bucket, "train/sizes.json"))
    assert list(sizes) == [f"{j:05d}.tar" for j in range(len(sizes))] and sum(sizes.values()) == stats["kept"]
    originals = samples_by_key(folder)
    seen = []
    for name, count in sizes.items():
        local = tmp_path / name
        local.write_bytes(s3_bytes(bucket, f"train/{name}"))
        samples = list(wds.WebDataset(str(local), shardshuffle=False))
        assert len(samples) == count
        for sample in samples:
            meta = json.loads(sample["json"])
            assert set(sample) >= {"__key__", "jpg", "txt", "json"}
            assert sample["jpg"] == originals[meta["key"]]["jpg"]  # not re-encoded
            assert sample["txt"] == originals[meta["key"]]["txt"]
            assert meta["clip_score"] >= stats["threshold"] and meta["source_shard"].endswith(".tar")
            seen.append(meta["key"])
    assert len(seen) == len(set(seen)) == stats["kept"]

    # and the same inputs and options give byte-identical shards (here into a local folder)
    local = tmp_path / "train-again"
    again = shards(str(local))
    assert again.returncode == 0, again.stderr
    for name in sizes:
        assert s3_bytes(bucket, f"train/{name}") == (local / name).read_bytes()

    # and open_clip's own training script trains on them unchanged
    trained = subprocess.run(
        [sys.executable, "-c", "import clipbatch.workers.models; from open_clip_train.main import main; import sys; "
         "main(sys.argv[1:])", "--dataset-type", "webdataset",
         "--train-data", f"{local}/{{00000..{len(sizes) - 1:05d}}}.tar", "--train-num-samples", str(stats["kept"]),
         "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--batch-size", "4", "--epochs", "1",
         "--workers", "0", "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "oc",
         "--lr", "1e-4", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Train Epoch: 0" in (tmp_path / "logs" / "oc" / "out.log").read_text()
    assert (tmp_path / "logs" / "oc" / "checkpoints" / "epoch_1.pt").is_file()
