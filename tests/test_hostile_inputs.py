"""Every hostile input row: processed or recorded with its reason; the shard always completes."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, run_cli, service_env
from tests.hostile import hostile_samples
from clipbatch.sample_data import write_shard
from clipbatch.workers.samples import RawSample, decode_sample, iter_raw_samples, open_rgb

CASES = hostile_samples()


@pytest.mark.parametrize(("key", "members", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_hostile_sample_gets_its_outcome(key, members, expected):
    sample = decode_sample(RawSample(key, members))
    if expected is None:
        assert sample.error is None and sample.image.mode == "RGB"
    else:
        assert sample.error is not None and sample.error.startswith(expected), sample.error


def test_decoding_is_faithful_for_the_tricky_formats():
    cases = {k: m for k, m, _ in CASES}
    rotated = open_rgb(cases["exif_rotated"]["jpg"])
    assert rotated.size == (40, 80)  # stored 80x40 with orientation 6: shown upright
    ramp = np.asarray(open_rgb(cases["png_16bit"]["png"]))
    assert 100 < ramp.mean() < 155 and ramp.max() > 240 and ramp.min() < 15  # scaled, not clipped to white


def test_garbage_and_empty_tars(tmp_path):
    garbage = [decode_sample(r) for r in iter_raw_samples(io.BytesIO(b"not a tar at all" * 100))]
    assert len(garbage) == 1 and "unreadable" in garbage[0].error
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with open(empty, "rb") as f:
        assert list(iter_raw_samples(f)) == []


@pytest.mark.integration
def test_a_hostile_shard_through_a_real_worker(tmp_path, checkpoint):
    # given: a shard holding every hostile sample, a truncated shard, a garbage one and empty ones
    inputs = tmp_path / "in"
    write_shard(inputs / "00000.tar", [(k, m) for k, m, _ in CASES])
    whole = inputs / "00000.tar"
    (inputs / "00001.tar").write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    (inputs / "00002.tar").write_bytes(b"\x00garbage" * 1000)
    (inputs / "00003.tar").write_bytes(b"")
    with tarfile.open(inputs / "00004.tar", "w"):
        pass
    out = tmp_path / "out"

    # when: the embedded default runs it with a real worker
    result = run_cli("run", "embed", "--input", str(inputs), "--output", str(out), "--model", "clipbatch-tiny",
                     "--pretrained", str(checkpoint), "--batch-size", "4", "--json",
                     env=service_env(f"redis://127.0.0.1:{free_port()}/0"), timeout=600)

    # then: every shard completed and every sample got the outcome in the table
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["shards_done"] == 5
    rows = {r["key"] for r in pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()}
    errors = {e["key"]: e["reason"] for e in pq.read_table(out / "errors" / "errors_0.parquet").to_pylist()}
    for key, _, expected in CASES:
        if expected is None:
            assert key in rows and key not in errors
        else:
            assert errors[key].startswith(expected) and key not in rows
    assert len(np.load(out / "img_emb" / "img_emb_0.npy")) == len(rows)
    truncated = pq.read_table(out / "errors" / "errors_1.parquet").to_pylist()
    assert truncated[-1]["key"] == "__shard__"
    assert pq.read_table(out / "metadata" / "metadata_1.parquet").num_rows >= 1  # samples before the cut kept
    assert [e["key"] for e in pq.read_table(out / "errors" / "errors_2.parquet").to_pylist()] == ["__shard__"]
    for i in (3, 4):  # empty shards: stats and an (empty) errors table, no empty embedding files
        assert not (out / "img_emb" / f"img_emb_{i}.npy").exists() and (out / "stats" / f"{i}.json").exists()
        assert pq.read_table(out / "errors" / f"errors_{i}.parquet").num_rows == 0
