"""Memory is bounded by documented caps, not by the input (issue 14, defect 10).

Memory is measured with tracemalloc (numpy's buffers and Python's bytes are traced; nothing is timed).
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from clipbatch.core import manifests, storage
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.sample_data import find_photos, photo_sample, write_shard
from clipbatch.workers import runtime, samples, writers
from clipbatch.workers.readers import open_shard
from clipbatch.workers.samples import decode_sample, iter_raw_samples, open_rgb

GOOD = photo_sample(find_photos()[0], random.Random(0))
MiB = 1 << 20


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (a test member that is never whole in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


class Counted(io.RawIOBase):
    """A stream that counts the bytes taken from it."""

    def __init__(self, data: bytes) -> None:
        self.inner, self.taken = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.taken += len(data)
        return data


def spec(path, fmt: str) -> JobSpec:
    return JobSpec(str(path), "/unused", ModelSpec("clipbatch-tiny"), input_format=fmt)


def errors_of(uri: str, fmt: str) -> dict[str, str | None]:
    _, source = open_shard(uri, spec(uri.split("#")[0], fmt))
    with source as raws:
        return {s.key: s.error for s in (decode_sample(r) for r in raws)}


@pytest.fixture()
def small_caps(monkeypatch):
    monkeypatch.setattr(samples, "MAX_MEMBER_BYTES", 100_000)
    monkeypatch.setattr(samples, "MAX_CAPTION_BYTES", 1_000)
    monkeypatch.setattr(samples, "MAX_SIDECAR_BYTES", 2_000)


def test_over_cap_members_are_error_rows_naming_their_cap(tmp_path, small_caps):
    # given: a shard with an image, a caption and a json sidecar each over its cap, between good samples
    path = tmp_path / "s.tar"
    write_shard(path, [("a", GOOD), ("img", {**GOOD, "jpg": GOOD["jpg"] + bytes(100_001)}),
                       ("cap", {**GOOD, "txt": b"x" * 1_001}), ("meta", {**GOOD, "json": b'"' + b"x" * 2_000 + b'"'}),
                       ("b", GOOD)])

    # when: it is read
    with open(path, "rb") as f:
        errors = {s.key: s.error for s in (decode_sample(r) for r in iter_raw_samples(f))}

    # then: each over-cap sample is an error row naming the cap; the good ones decode
    assert errors["a"] is None and errors["b"] is None
    assert errors["img"].startswith("member too large: img.jpg is ") and "CLIPBATCH_MAX_MEMBER_BYTES=100000" in errors["img"]
    assert errors["cap"] == "member too large: cap.txt is 1001 bytes, over CLIPBATCH_MAX_CAPTION_BYTES=1000"
    assert errors["meta"] == "member too large: meta.json is 2002 bytes, over CLIPBATCH_MAX_SIDECAR_BYTES=2000"


def test_a_gzip_member_inflating_past_the_cap_is_skipped_in_bounded_memory(tmp_path, monkeypatch):
    # given: a small .tar.gz whose image member inflates to 32 MiB, with a 1 MiB member cap
    monkeypatch.setattr(samples, "MAX_MEMBER_BYTES", MiB)
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, size, data in (("bomb.jpg", 32 * MiB, None), ("bomb.txt", 3, b"cap")):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(data) if data else io.BufferedReader(Zeros(size)))
    assert path.stat().st_size < MiB

    # when: it is read under tracemalloc
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            raws = list(iter_raw_samples(f))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # then: one error row naming the cap, and the member was never held: peak well under the cap
    assert [(r.key, r.error) for r in raws] == [
        ("bomb", f"member too large: bomb.jpg is {32 * MiB} bytes, over CLIPBATCH_MAX_MEMBER_BYTES={MiB}")]
    assert peak < MiB, peak


def test_members_no_one_reads_are_not_read():
    # given: a tar with a member of an extension no reader uses
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("k.jpg", GOOD["jpg"]), ("k.txt", b"cap"), ("k.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    # when / then: the sample has its image and caption; the unused member is named, not read
    (raw,) = list(iter_raw_samples(io.BytesIO(buf.getvalue())))
    assert raw.members == {"jpg": GOOD["jpg"], "txt": b"cap", "cls": b""}


def test_caps_bound_folder_and_manifest_inputs_too(tmp_path, small_caps):
    # given: an image folder with an over-cap image, and a manifest naming it and an over-cap caption
    (tmp_path / "f").mkdir()
    for key, image in (("a", GOOD["jpg"]), ("big", GOOD["jpg"] + bytes(100_001))):
        (tmp_path / "f" / f"{key}.jpg").write_bytes(image)
        (tmp_path / "f" / f"{key}.txt").write_text("cap")
    rows = [{"image": "f/a.jpg", "caption": "c"}, {"image": "f/big.jpg", "caption": "c"},
            {"image": "f/a.jpg", "caption": "x" * 1_001}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # when: both are read
    folder = errors_of(f"{tmp_path / 'f'}#rows=0-2", "folder")
    manifest = errors_of(str(tmp_path / "m.jsonl"), "manifest")

    # then: the over-cap image and caption are error rows naming their caps
    assert folder["a"] is None and folder["big"].startswith("member too large:")
    assert "CLIPBATCH_MAX_MEMBER_BYTES=100000" in folder["big"]
    assert manifest["m/0000000"] is None
    assert manifest["m/0000001"] == f"member too large: {tmp_path / 'f' / 'big.jpg'} is over CLIPBATCH_MAX_MEMBER_BYTES=100000 bytes"
    assert manifest["m/0000002"].startswith("member too large: m/0000002.txt is 1001 bytes")


def test_caps_come_from_the_environment():
    # given / when: a fresh interpreter with the caps set, and one with a bad value
    code = "from clipbatch.workers import samples as s; print(s.MAX_MEMBER_BYTES, s.MAX_CAPTION_BYTES, s.MAX_SIDECAR_BYTES)"
    env = {**os.environ, "CLIPBATCH_MAX_MEMBER_BYTES": "123", "CLIPBATCH_MAX_CAPTION_BYTES": "45",
           "CLIPBATCH_MAX_SIDECAR_BYTES": "67"}
    set_ = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "CLIPBATCH_MAX_MEMBER_BYTES": "lots"},
                         capture_output=True, text=True)

    # then: the values are used, the defaults are documented constants, and a bad value names its variable
    assert set_.stdout.split() == ["123", "45", "67"], set_.stderr
    assert (samples.DEFAULT_MAX_MEMBER_BYTES, samples.DEFAULT_MAX_CAPTION_BYTES,
            samples.DEFAULT_MAX_SIDECAR_BYTES) == (64 * MiB, 64 << 10, MiB)
    assert "CLIPBATCH_MAX_MEMBER_BYTES='lots' is not a positive number of bytes" in bad.stderr


def test_a_16_bit_png_is_converted_without_float64_copies():
    # given: a 1200x1200 16-bit greyscale PNG ramp
    ramp = np.linspace(0, 65535, 1200 * 1200).reshape(1200, 1200).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")

    # when: it is decoded to RGB under tracemalloc
    tracemalloc.start()
    try:
        rgb = open_rgb(buf.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # then: the scaling is exact (floor of v * 255 / 65535), and the peak stays under 10 bytes a pixel
    expected = (ramp.astype(np.uint64) * 255 // 65535).astype(np.uint8)
    assert np.array_equal(np.asarray(rgb)[:, :, 0], expected)
    assert peak < 10 * ramp.size, peak / ramp.size


def test_decode_threads_follow_the_containers_cpu_limit(tmp_path, monkeypatch):
    # given: a host reporting 64 CPUs, an affinity mask of 8, and a cgroup v2 quota of 1.5 CPUs
    monkeypatch.delenv("CLIPBATCH_DECODE_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    monkeypatch.setattr(runtime, "CGROUP_ROOT", str(tmp_path))

    # when / then: two decode threads (the quota, rounded up); the mask when the quota is "max"
    assert runtime.decode_threads() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.decode_threads() == 8


class CountingDict(dict):
    """A dict that counts every lookup or walk over it."""

    calls = 0

    def _count(name):  # noqa: N805 (builds the counting methods below)
        def method(self, *args):
            CountingDict.calls += 1
            return getattr(dict, name)(self, *args)
        return method

    get, __getitem__, __iter__, items, keys, values, __contains__ = map(
        _count, ("get", "__getitem__", "__iter__", "items", "keys", "values", "__contains__"))


def test_building_metadata_is_one_pass_over_the_json_fields():
    # given: 400 samples, each with a json field no other sample has
    n = 400
    metas = [CountingDict({f"field{i}": i}) for i in range(n)]
    rows = [{"key": str(i), "caption": "c", "shard": "s"} for i in range(n)]
    CountingDict.calls = 0

    # when: their metadata is written
    data = writers.metadata_bytes(rows, metas, {"clip_score": [0.0] * n})

    # then: each sample's fields were walked a constant number of times, not once per distinct field
    assert CountingDict.calls <= 2 * n, CountingDict.calls
    assert len(data) > 0


def counting_reads(monkeypatch) -> list[Counted]:
    """Make local storage hand out streams that count what is read from them; returns them as opened."""
    opened: list[Counted] = []

    def open_read(self, key: str) -> Counted:
        opened.append(Counted(self._path(key).read_bytes()))
        return opened[-1]

    monkeypatch.setattr(storage.LocalStorage, "open_read", open_read)
    return opened


def test_a_manifest_range_stops_reading_after_its_last_row(tmp_path, monkeypatch):
    # given: a 20000-row JSONL manifest (2 MB) whose reads are counted
    (tmp_path / "0.jpg").write_bytes(GOOD["jpg"])
    lines = "".join(json.dumps({"image": "0.jpg", "caption": f"{i} " + "c" * 80}) + "\n" for i in range(20_000))
    (tmp_path / "m.jsonl").write_text(lines)
    opened = counting_reads(monkeypatch)

    # when: the task for rows 100-110 reads it
    errors = errors_of(f"{tmp_path / 'm.jsonl'}#rows=100-110", "manifest")

    # then: just those rows, and reading stopped within a buffer of the last one
    assert errors == {f"m/{i:07d}": None for i in range(100, 110)}
    assert opened[0].taken < 2 * (64 << 10) < len(lines) // 10, opened[0].taken


def test_an_over_long_manifest_line_is_an_error_row_never_held_whole(tmp_path, monkeypatch):
    # given: a JSONL manifest with a 5 MB line between two rows, and a 64 KiB row cap
    monkeypatch.setattr(manifests, "MAX_MANIFEST_ROW_BYTES", 64 << 10)
    (tmp_path / "a.jpg").write_bytes(GOOD["jpg"])
    good = json.dumps({"image": "a.jpg", "caption": "c"}).encode() + b"\n"
    (tmp_path / "m.jsonl").write_bytes(good + b'{"caption": "' + b"x" * 5_000_000 + b'"}\n' + good)

    # when: it is read under tracemalloc
    tracemalloc.start()
    try:
        errors = errors_of(str(tmp_path / "m.jsonl"), "manifest")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # then: the long line is one error row naming the cap, and it never was in memory whole
    assert errors == {"m/0000000": None, "m/0000002": None,
                      "m/0000001": "manifest line 2 is longer than CLIPBATCH_MAX_MANIFEST_ROW_BYTES=65536"}
    assert peak < 2 * MiB, peak


@pytest.mark.integration
def test_a_multiline_jsonl_manifest_in_s3_reads_line_by_line(bucket):
    # given: a JSONL manifest in S3 with lines longer than botocore's 1 KiB iteration chunks
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="m/0.jpg", Body=GOOD["jpg"])
    rows = [{"image": "0.jpg", "caption": f"caption {i} " + "w" * 1500} for i in range(3)]
    s3.put_object(Bucket=bucket, Key="m/list.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())

    # when / then: every row is a sample (the body is streamed and split into lines, not 1 KiB chunks)
    uri = f"s3://{bucket}/m/list.jsonl"
    assert errors_of(f"{uri}#rows=1-3", "manifest") == {"list/0000001": None, "list/0000002": None}
