"""The write stage's tar reading and writing without tarfile's objects (workers/fasttar.py): the same bytes
as tarfile's USTAR writer, the same members as tarfile's reader, tarfile's reader where a tar is not plain."""
from __future__ import annotations

import gzip
import io
import tarfile

from hypothesis import given, settings, strategies as st

from clipbatch.workers.fasttar import iter_selected
from clipbatch.workers.writers import FIXED_MTIME, write_tar

KEYS = st.one_of(st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True), st.from_regex(r"(d/){1,60}k[0-9]", fullmatch=True),
                 st.from_regex(r"[é日a-z]{1,8}", fullmatch=True), st.from_regex(r"x{95,101}", fullmatch=True))
SAMPLES = st.lists(st.tuples(KEYS, st.binary(max_size=1100), st.binary(max_size=40)), max_size=8,
                   unique_by=lambda s: s[0])


def tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(raw=SAMPLES, picks=st.lists(st.booleans(), min_size=8, max_size=8))
def test_tars_are_tarfiles_bytes_and_read_back_as_tarfile_reads_them(raw, picks):
    # given: samples with short, long, nested and non-ASCII keys and members of every size around a block
    samples = [(key, {"jpg": image, "txt": text}) for key, image, text in raw]
    try:
        expected = tarfile_bytes(samples)
    except ValueError:  # a name USTAR cannot hold: refused alike
        try:
            write_tar(io.BytesIO(), samples)
        except ValueError:
            return
        raise AssertionError("write_tar accepted a name tarfile refuses")
    # when: they are written, and some of them read back
    buf = io.BytesIO()
    assert write_tar(buf, samples) == len(samples)
    wanted = {key for (key, _), pick in zip(samples, picks) if pick}
    got = iter_selected(lambda: io.BytesIO(buf.getvalue()), wanted)
    # then: tarfile's bytes, and exactly the wanted samples' members
    assert buf.getvalue() == expected
    assert got == {key: members for key, members in samples if key in wanted}


def test_tars_that_are_not_plain_ustar_are_read_by_tarfile():
    # given: the same samples as a pax tar with a long name, and as a gzipped tar
    samples = [("a" * 150, {"jpg": b"x" * 700, "txt": b"one"}), ("b", {"jpg": b"y", "txt": b"two"})]
    pax = tarfile_bytes(samples, tarfile.PAX_FORMAT)
    zipped = gzip.compress(tarfile_bytes(samples[1:]), mtime=0)
    # when / then: the wanted members come back
    assert iter_selected(lambda: io.BytesIO(pax), {"a" * 150}) == {"a" * 150: samples[0][1]}
    assert iter_selected(lambda: io.BytesIO(zipped), {"b"}) == {"b": samples[1][1]}
