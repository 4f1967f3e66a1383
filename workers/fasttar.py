"""Plain ustar reading and writing without tarfile's per-member objects, for the curation write stage.

``write_ustar`` writes the same bytes as ``tarfile`` in USTAR format with the members' size, a fixed mtime
and mode 0644 (what ``writers.write_tar`` asks for): a header built from a template, its checksum, the data
padded to 512 bytes, two zero blocks and padding to tarfile's record size. A name ``tarfile`` would encode
otherwise (longer than 100 bytes, not ASCII) takes ``TarInfo.tobuf``'s header, so the bytes never differ.

``iter_selected`` streams a tar once, up to the last wanted sample, and returns the members of the wanted
keys only; the others' data is skipped (a seek where the stream can); every header's checksum is checked.
A tar with anything but plain file headers (pax, GNU long names, links, compression), a damaged one and
one that lacks a wanted key are left to ``samples.iter_raw_samples``.
"""
from __future__ import annotations

import functools
import tarfile
from typing import BinaryIO, Callable, Iterable, Iterator

from clipbatch.workers.samples import iter_raw_samples, split_name

BLOCK = 512
RECORD = tarfile.RECORDSIZE
_PLAIN = (b"0", b"\0")
_ENCODING, _ERRORS = "utf-8", "surrogateescape"


def _octal(n: int, digits: int) -> bytes:
    """tarfile's itn for a POSIX field: zero-padded octal and a NUL."""
    return b"%0*o\0" % (digits - 1, n)


def _template(mtime: int, mode: int) -> bytes:
    """tarfile's own header for a one-letter name, with the name and checksum fields blanked (this Python's
    tarfile decides every other field, device numbers included)."""
    info = tarfile.TarInfo("x")
    info.mtime, info.mode = mtime, mode
    buf = bytearray(info.tobuf(tarfile.USTAR_FORMAT, _ENCODING, _ERRORS))
    buf[0:100], buf[148:156] = b"\0" * 100, b" " * 8
    return bytes(buf)


@functools.lru_cache(maxsize=8)
def template_sum(template: bytes) -> int:
    """The template's bytes but its (blank) size field."""
    return sum(template) - sum(template[124:136])


def _header(name: str, size: int, template: bytes, mtime: int, mode: int) -> bytes:
    raw = name.encode("ascii", "strict") if name.isascii() else b""
    if not raw or len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, mode
        return info.tobuf(tarfile.USTAR_FORMAT, _ENCODING, _ERRORS)
    buf = bytearray(template)
    field = _octal(size, 12)
    buf[0:len(raw)], buf[124:136] = raw, field
    # the checksum: every byte, the checksum field counted as spaces (tarfile's calc_chksums); the template's
    # sum holds all but the name and the size
    buf[148:156] = b"%06o\0 " % (template_sum(template) + sum(raw) + sum(field))
    return bytes(buf)


def write_ustar(write: Callable[[bytes], object], samples: Iterable[tuple[str, dict[str, bytes]]], mtime: int,
                mode: int = 0o644) -> int:
    """Write (key, {ext: bytes}) samples through ``write``; returns the count. Same bytes as tarfile's."""
    template, count, offset = _template(mtime, mode), 0, 0
    for key, members in samples:
        for ext, data in members.items():
            write(_header(f"{key}.{ext}", len(data), template, mtime, mode))
            write(data)
            pad = -len(data) % BLOCK
            if pad:
                write(b"\0" * pad)
            offset += BLOCK + len(data) + pad
        count += 1
    offset += 2 * BLOCK
    write(b"\0" * (2 * BLOCK + (-offset % RECORD)))
    return count


def _plain_members(stream: BinaryIO, wanted: set[str]) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, ext, data or None when not wanted) per file member; ValueError on anything but a plain file."""
    seekable = stream.seekable() if hasattr(stream, "seekable") else False
    while True:
        head = stream.read(BLOCK)
        if not head or head == b"\0" * BLOCK:
            return
        if len(head) < BLOCK:
            raise ValueError("truncated header")
        if head[156:157] not in _PLAIN or head[257:263] not in (b"ustar\x00", b"ustar "):
            raise ValueError("not a plain ustar member")
        name = head[:100].split(b"\0", 1)[0]
        prefix = head[345:500].split(b"\0", 1)[0]
        name = (prefix + b"/" + name if prefix else name).decode(_ENCODING, _ERRORS)
        size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        key, ext = split_name(name)
        padded = size + (-size % BLOCK)
        if int(head[148:156].split(b"\0", 1)[0].strip() or b"0", 8) != sum(head[:148]) + sum(head[156:]) + 256:
            raise ValueError("bad checksum")
        if key in wanted:
            data = stream.read(padded)[:size]
            if len(data) < size:
                raise ValueError("truncated member")
            yield key, ext, data
        else:
            if seekable:
                stream.seek(padded, 1)
            else:
                while padded:
                    got = len(stream.read(min(padded, 1 << 20)))
                    if not got:
                        raise ValueError("truncated member")
                    padded -= got
            yield key, ext, None


def iter_selected(open_stream: Callable[[], BinaryIO], wanted: set[str]) -> dict[str, dict[str, bytes]]:
    """The members of the ``wanted`` samples of a tar, streamed once up to the last of them, with tarfile's
    reader where the tar is not plain, is damaged or lacks one of them. A key names the first sample under it
    (``samples.iter_raw_samples`` makes each later one an error row): a later run of members under a key
    already passed is not read into it."""
    found: dict[str, dict[str, bytes]] = {}
    try:
        with open_stream() as stream:
            found = _first_runs(_plain_members(stream, wanted), wanted)
    except ValueError:
        found = {}
    if len(found) == len(wanted):
        return found
    with open_stream() as stream:
        for raw in iter_raw_samples(stream):
            if raw.key in wanted and raw.error is None:
                found[raw.key] = raw.members
    return found


def _first_runs(members: Iterator[tuple[str, str, bytes | None]], wanted: set[str]) -> dict[str, dict[str, bytes]]:
    """The wanted samples' members, each from the first run of members under its key; stops once all are read
    (a sample's members are contiguous)."""
    found: dict[str, dict[str, bytes]] = {}
    passed: set[str] = set()  # keys whose first run is over
    last = None
    for key, ext, data in members:
        if key != last:
            if last is not None:
                passed.add(last)
            if len(found) == len(wanted):
                break
            last = key
        if data is not None and key not in passed:
            found.setdefault(key, {})[ext] = data
    return found
