"""A damaged tar is loud: a header that fails its checksum anywhere, a tar cut short, bytes after its end.

tarfile in stream mode stops without a word at a bad header past the first block, so a shard corrupt in its
middle read as a shorter, healthy one (6 of 10 samples, no error row). Given such tars, when they are read
(the embed stage's reader, and the write stage's fast reader and its tarfile fallback), then reading resumes
at the next valid header, the sample that lost a member is an error row, and one ``__shard__`` error row
names the byte offset of the damage. And a real worker's job over such a shard has every sample exactly once,
as a row or an error row.
"""
from __future__ import annotations

import gzip
import io
import random
import tarfile
import uuid
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.orchestration import Client
from clipbatch.sample_data import shape_image
from clipbatch.workers.fasttar import iter_selected
from clipbatch.workers.samples import TRUNCATED_KEY, decode_sample, iter_raw_samples
from clipbatch.workers.writers import write_tar
from tests.conftest import service_env

KEYS = [f"k{i}" for i in range(10)]
DAMAGED = "k5"


def png(i: int) -> bytes:
    buf = io.BytesIO()
    shape_image("red", "circle", random.Random(i)).save(buf, "PNG")
    return buf.getvalue()


def tar_of(keys: list[str]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, [(k, {"png": png(i), "txt": f"a red circle {i}".encode()}) for i, k in enumerate(keys)])
    return buf.getvalue()


def offsets(data: bytes) -> dict[str, int]:
    """Each member's header offset, as tarfile reads the tar whole."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset for m in tar}


def corrupt_header(data: bytes, name: str) -> tuple[bytes, int]:
    """``data`` with one bit of member ``name``'s header flipped (in its mtime: the name still reads)."""
    at = offsets(data)[name]
    damaged = bytearray(data)
    damaged[at + 140] ^= 1
    return bytes(damaged), at


def read(data: bytes) -> list:
    return [decode_sample(raw) for raw in iter_raw_samples(io.BytesIO(data))]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_a_bad_header_in_the_middle_is_an_error_row_and_reading_resumes_after_it(compressed):
    # given: ten samples, the header of k5's image failing its checksum
    data, at = corrupt_header(tar_of(KEYS), f"{DAMAGED}.png")

    # when: the tar is read
    samples = read(gzip.compress(data, mtime=0) if compressed else data)

    # then: every sample once, the one that lost its image an error, the others whole, and the damage named
    assert [s.key for s in samples] == [*KEYS, TRUNCATED_KEY]
    assert [s.key for s in samples if s.error] == [DAMAGED, TRUNCATED_KEY]
    assert samples[5].error.startswith("tar member lost")
    assert samples[-1].error.startswith("shard corrupt: invalid tar header at byte %d (bad checksum" % at)
    assert "reading resumed at byte" in samples[-1].error
    assert [s.caption for s in samples[6:10]] == [f"a red circle {i}" for i in range(6, 10)]


def test_the_write_stages_readers_read_past_a_bad_header():
    # given: the same damage; the write stage wants samples after it, and the damaged one
    data, _ = corrupt_header(tar_of(KEYS), f"{DAMAGED}.png")
    whole = {k: {"png": png(i), "txt": f"a red circle {i}".encode()} for i, k in enumerate(KEYS)}

    # when: they are looked up (the fast reader refuses the bad checksum and tarfile's reader takes over)
    found = iter_selected(lambda: io.BytesIO(data), {"k3", DAMAGED, "k8"})

    # then: the whole samples, byte for byte; the damaged one is not found (the write stage then fails loudly)
    assert found == {"k3": whole["k3"], "k8": whole["k8"]}


def test_a_sample_whose_members_straddle_a_bad_header_is_an_error_whatever_the_header_names():
    # given: samples of an image, a json sidecar and a caption; k5's json header has its name overwritten too
    buf = io.BytesIO()
    write_tar(buf, [(k, {"png": png(i), "json": b'{"n": %d}' % i, "txt": b"a caption"}) for i, k in enumerate(KEYS)])
    data = bytearray(buf.getvalue())
    at = offsets(bytes(data))[f"{DAMAGED}.json"]
    data[at:at + 7] = b"\x01zzzzz\x02"

    # when: it is read
    raws = list(iter_raw_samples(io.BytesIO(bytes(data))))

    # then: k5 (its image and caption read, its json lost) is an error, not a row without its metadata
    assert [r.key for r in raws] == [*KEYS, TRUNCATED_KEY]
    assert [r.key for r in raws if r.error] == [DAMAGED, TRUNCATED_KEY]
    assert raws[5].error.startswith("tar member lost") and f"invalid tar header at byte {at}" in raws[-1].error


@pytest.mark.parametrize("cut", ["at_a_member", "inside_a_member", "inside_a_header"])
def test_a_truncated_tar_ends_with_an_error_row(cut):
    # given: the tar cut short: where k6 starts (no end blocks), inside k6's image, inside k6's image header
    data = tar_of(KEYS)
    at = offsets(data)["k6.png"]
    end = {"at_a_member": at, "inside_a_member": at + 700, "inside_a_header": at + 300}[cut]

    # when / then: the samples before are kept, and the cut is an error row (k6 too when its header was read)
    samples = read(data[:end])
    assert [s.key for s in samples][:6] == KEYS[:6] and all(s.error is None for s in samples[:6])
    assert samples[-1].key == TRUNCATED_KEY and samples[-1].error.startswith("shard unreadable after this point")
    assert len(samples) == (8 if cut == "inside_a_member" else 7)
    if cut != "inside_a_member":
        assert f"byte {at}" in samples[-1].error


def test_garbage_after_the_end_is_named_and_costs_no_sample():
    # given: a whole tar with garbage after its end-of-archive blocks, and one whose last blocks are garbage
    data = tar_of(KEYS)
    after_end = data + b"garbage!" * 300
    end = offsets(data)["k9.txt"] + 1024  # k9's caption header and data block: the end blocks start there
    instead_of_end = data[:end] + b"garbage!" * 300

    # when / then: every sample is read, and the garbage is an error row naming where it starts
    samples = read(after_end)
    assert [s.key for s in samples] == [*KEYS, TRUNCATED_KEY] and all(s.error is None for s in samples[:-1])
    assert samples[-1].error.startswith("shard corrupt") and f"from byte {len(data)}" in samples[-1].error
    samples = read(instead_of_end)
    assert [s.key for s in samples] == [*KEYS, TRUNCATED_KEY] and all(s.error is None for s in samples[:-1])
    assert samples[-1].error.startswith(f"shard unreadable after this point: invalid tar header at byte {end}")


def test_a_whole_tar_has_no_error_row():
    assert [s.key for s in read(tar_of(KEYS)) if s.error] == []


@pytest.mark.integration
def test_a_job_over_a_shard_with_a_bad_header_has_every_sample_once(tmp_path, checkpoint, redis_url, start_worker):
    # given: a shard whose k5 image header fails its checksum, beside a whole one
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    data, at = corrupt_header(tar_of(KEYS), f"{DAMAGED}.png")
    (inputs / "00000.tar").write_bytes(tar_of([f"w{i}" for i in range(3)]))
    (inputs / "00001.tar").write_bytes(data)
    queue = f"corrupt-{uuid.uuid4().hex[:8]}"
    start_worker(queue, service_env(redis_url))

    # when: a real worker embeds them
    client = Client(replace(Settings.from_env(), broker_url=redis_url))
    job = client.submit(JobSpec(str(inputs), str(out), ModelSpec("clipbatch-tiny", str(checkpoint)), queue=queue))
    status = job.wait(timeout_s=300)

    # then: the job ends, each sample of the damaged shard is a row or an error row exactly once, and one
    # shard error row names the offset of the bad header
    assert status["state"] == "succeeded", status
    rows = pq.read_table(out / "metadata" / "metadata_1.parquet").column("key").to_pylist()
    errors = pq.read_table(out / "errors" / "errors_1.parquet").to_pylist()
    keys = rows + [e["key"] for e in errors if e["key"] != TRUNCATED_KEY]
    assert sorted(keys) == sorted(KEYS) and [e["key"] for e in errors] == [DAMAGED, TRUNCATED_KEY]
    assert f"invalid tar header at byte {at}" in errors[-1]["reason"]
    assert (status["samples_done"], status["samples_failed"]) == (3 + 9, 2)
