"""One bad sample is one error row: whatever its bytes make a parser raise, the shard completes.

Issue 14, defect 3: a deeply nested json sidecar raised RecursionError past the ValueError
handler, and the task retried, dead-lettered the shard and failed the job.
"""
from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.sample_data import find_photos, photo_sample, write_shard
from clipbatch.workers import writers
from clipbatch.workers.readers import open_shard
from clipbatch.workers.samples import decode_sample, iter_raw_samples
from tests.conftest import free_port, run_cli, service_env

DEEP = b"[" * 100_000
GOOD = photo_sample(find_photos()[0], random.Random(0))


def decoded(path, input_format: str = "auto", **options) -> dict[str, str | None]:
    """key -> error reason (None when the sample decodes) of one whole input, through open_shard."""
    spec = JobSpec(str(path), "/unused", ModelSpec("clipbatch-tiny"), input_format=input_format, **options)
    _, source = open_shard(str(path), spec)
    with source as raws:
        return {s.key: s.error for s in (decode_sample(r) for r in raws)}


def test_a_deeply_nested_json_sidecar_is_its_samples_error_row(tmp_path):
    # given: a shard whose middle sample's json sidecar nests 100000 levels deep
    path = tmp_path / "s.tar"
    write_shard(path, [("a", GOOD), ("deep", {**GOOD, "json": DEEP}), ("b", GOOD)])

    # when: it is read and decoded
    with open(path, "rb") as f:
        samples = {s.key: s for s in (decode_sample(r) for r in iter_raw_samples(f))}

    # then: that sample is an error row with a fixed category; its neighbours decode
    assert samples["deep"].error == "json member is not valid JSON: nested too deeply"
    assert samples["a"].error is None and samples["b"].error is None


def test_a_deeply_nested_manifest_line_is_its_rows_error(tmp_path):
    # given: a JSONL manifest with a line nesting 100000 levels deep between two good rows
    (tmp_path / "0.jpg").write_bytes(GOOD["jpg"])
    good = json.dumps({"image": "0.jpg", "caption": "zero"}).encode()
    (tmp_path / "m.jsonl").write_bytes(good + b"\n" + b'{"x": ' + DEEP + b"\n" + good + b"\n")

    # when / then: only that row is an error
    errors = decoded(tmp_path / "m.jsonl", "manifest")
    assert errors == {"m/0000000": None, "m/0000001": "manifest line 2 is not valid JSON: nested too deeply",
                      "m/0000002": None}


def test_hostile_csv_rows_are_their_own_errors(tmp_path):
    # given: a CSV manifest with a field over csv's size limit and a row with more fields than its header
    (tmp_path / "0.jpg").write_bytes(GOOD["jpg"])
    huge = "x" * 200_000
    (tmp_path / "m.csv").write_text(f"image,caption\n0.jpg,zero\n0.jpg,{huge}\n0.jpg,one,extra\n0.jpg,two\n")

    # when / then: each bad row is an error row; the rows after them are read
    errors = decoded(tmp_path / "m.csv", "manifest")
    assert list(errors) == [f"m/{i:07d}" for i in range(4)]
    assert errors["m/0000000"] is None and errors["m/0000003"] is None
    assert errors["m/0000001"].startswith("manifest line 3 is not valid CSV: field larger than field limit")
    assert errors["m/0000002"] == "manifest line 4 has more fields than the header"


def test_a_parquet_row_arrow_cannot_convert_is_its_error(tmp_path):
    # given: a parquet file whose pass-through timestamp column holds a date past Python's datetime range
    when = pa.array([0, 10**17, 0], pa.timestamp("s"))
    pq.write_table(pa.table({"image": [GOOD["jpg"]] * 3, "caption": ["a", "b", "c"], "when": when}),
                   tmp_path / "d.parquet")

    # when / then: that row is an error row, the others are samples
    errors = decoded(tmp_path / "d.parquet", "parquet")
    assert errors["d/0000000"] is None and errors["d/0000002"] is None
    assert errors["d/0000001"].startswith("row unreadable: OverflowError")


def test_a_json_number_arrow_cannot_hold_is_kept_as_text():
    # given: metadata where one sample's json field holds an integer past 64 bits
    rows = [{"key": k, "caption": "c", "shard": "s"} for k in ("a", "b")]

    # when: the metadata is written
    table = pq.read_table(io.BytesIO(writers.metadata_bytes(rows, [{"n": 2**70}, {"n": 1}], {"clip_score": [0.1, 0.2]})))

    # then: the column is text, nothing is lost, and the shard's output is written
    assert table.column("n").to_pylist() == [str(2**70), "1"]


def test_error_reasons_hold_no_memory_addresses():
    from clipbatch.workers.samples import describe

    class Thing:
        pass

    reason = describe(RuntimeError(f"cannot use {Thing()!r}"))
    assert "0x" not in reason and reason.startswith("RuntimeError: cannot use <")


@pytest.mark.integration
def test_a_shard_with_a_deeply_nested_json_completes_through_a_real_worker(tmp_path, checkpoint):
    # given: a webdataset shard where one sample's json nests 100000 levels deep
    inputs = tmp_path / "in"
    write_shard(inputs / "00000.tar", [("a", GOOD), ("deep", {**GOOD, "json": DEEP}), ("b", GOOD)])
    out = tmp_path / "out"

    # when: it runs as a job with a real worker
    result = run_cli("run", "embed", "--input", str(inputs), "--output", str(out), "--model", "clipbatch-tiny",
                     "--pretrained", str(checkpoint), "--batch-size", "4", "--json",
                     env=service_env(f"redis://127.0.0.1:{free_port()}/0"), timeout=600)

    # then: the job succeeds; each sample is exactly one row or one error row
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["shards_done"] == 1
    rows = [r["key"] for r in pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()]
    errors = pq.read_table(out / "errors" / "errors_0.parquet").to_pylist()
    assert rows == ["a", "b"]
    assert [(e["key"], e["reason"]) for e in errors] == [("deep", "json member is not valid JSON: nested too deeply")]

