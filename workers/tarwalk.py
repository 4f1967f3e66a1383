"""Walk a tar stream's members with tarfile, and say what it would have skipped in silence.

In stream mode tarfile ends quietly, as if the tar were over, at a header that fails its checksum
past the first block, at a header cut short and at a stream that stops without its end-of-archive
blocks: a shard corrupt in its middle reads as a shorter, healthy one. Here tarfile reads with
``ignore_zeros``, which steps over a block that is not a header and tries the next, so reading
resyncs at the next valid header (aligned to 512 bytes, as every header is) and the members after
a corrupt header are read; a ``TarInfo`` subclass sees every block tarfile tries as a header and
records each stretch it skipped, by byte offset (of the uncompressed tar), and how the tar ended.
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Iterator

MAX_LISTED = 10  # problems named in a shard's reason; the rest are counted
_NAME_BYTES = 100  # a ustar header's name field
_NAME_SHOWN = 60  # characters of a bad header's name a reason quotes


class TarWalk:
    """The file members of a tar stream in order (``for member in walk``, ``walk.read(member)``).

    ``problems`` names each stretch of bytes that held no member and each way the tar ended early,
    ``names`` the member names the corrupt headers still show, ``damage`` counts the stretches (a
    sample whose members straddle one lost a member) and ``stopped`` is set when the tar ended damaged
    (whatever followed is lost). Attributes are current as each member is yielded.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.problems: list[str] = []
        self.names: set[str] = set()
        self.damage = 0
        self.stopped = False
        self._bad: tuple[int, str, bool] | None = None  # an open stretch: its offset, what, after the end blocks
        self._ended = False  # the last block read was an end-of-archive (all-zero) block
        self._block = b""
        self._tar: tarfile.TarFile | None = None

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        with tarfile.open(fileobj=self.fileobj, mode="r|", ignore_zeros=True, tarinfo=self._watched()) as tar:
            self._tar = tar
            yield from (member for member in tar if member.isfile())

    def read(self, member: tarfile.TarInfo) -> bytes:
        handle = self._tar.extractfile(member) if self._tar is not None else None
        return handle.read() if handle else b""

    def reason(self, failure: str | None = None) -> str | None:
        """The shard's error reason (``failure``: what stopped reading, if anything did); None when whole."""
        problems = self.problems + ([failure] if failure else [])
        if not problems:
            return None
        head = "shard unreadable after this point" if self.stopped or failure else "shard corrupt"
        more = [f"{len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        return f"{head}: {'; '.join(problems[:MAX_LISTED] + more)}"

    def _watched(self) -> type[tarfile.TarInfo]:
        walk = self

        class Watched(tarfile.TarInfo):
            @classmethod
            def frombuf(cls, buf, encoding, errors):  # noqa: ANN001 (tarfile's signature)
                walk._block = buf
                return super().frombuf(buf, encoding, errors)

            @classmethod
            def fromtarfile(cls, tar):  # noqa: ANN001 (tarfile's signature)
                offset = tar.fileobj.tell()
                try:
                    info = super().fromtarfile(tar)
                except tarfile.HeaderError as exc:
                    walk._failed(offset, exc)
                    raise
                walk._close(offset)
                walk._ended = False
                return info

        return Watched

    def _failed(self, offset: int, exc: tarfile.HeaderError) -> None:
        """tarfile found no header at ``offset``: a bad block, zeros, or the end of the stream."""
        if isinstance(exc, tarfile.EOFHeaderError):
            self._close(offset)
            self._ended = True
        elif isinstance(exc, tarfile.InvalidHeaderError):
            if self._bad is None:
                self._bad = (offset, f"{exc}{self._name()}", self._ended)
            self._ended = False
        elif offset > 0:  # empty or short: the stream is over (at 0 tarfile raises ReadError itself)
            self._end(offset, isinstance(exc, tarfile.TruncatedHeaderError))

    def _name(self) -> str:
        """``, name 'x.jpg'`` when the bad block's name field still reads as one; else nothing."""
        name = self._block[:_NAME_BYTES].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not name or not name.isprintable():
            return ""
        self.names.add(name)
        return f", name {name[:_NAME_SHOWN]!r}{'...' if len(name) > _NAME_SHOWN else ''}"

    def _close(self, offset: int) -> None:
        """A header or end block at ``offset`` ends the open stretch of bad blocks: reading resumes there."""
        if self._bad is not None:
            start, what, _ = self._bad
            self._bad = None
            self.damage += 1
            self.problems.append(f"invalid tar header at byte {start} ({what}): {offset - start} bytes skipped, "
                                 f"reading resumed at byte {offset}")

    def _end(self, offset: int, truncated: bool) -> None:
        if self._bad is not None:
            start, what, after_end = self._bad
            self._bad = None
            self.damage += 1
            if after_end:
                self.problems.append(f"{offset - start} bytes that are not tar data follow the end-of-archive "
                                     f"blocks, from byte {start}")
                return
            self.problems.append(f"invalid tar header at byte {start} ({what}) and no valid header after it: "
                                 f"the {offset - start} bytes to the end are unread")
        elif truncated:
            self.problems.append(f"the tar is cut short at byte {offset}, inside a header")
        elif not self._ended:
            self.problems.append(f"the tar ends at byte {offset} without its end-of-archive blocks (cut short)")
        else:
            return
        self.stopped = True
