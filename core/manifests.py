"""Read JSONL and CSV manifests as rows, streamed, and fingerprint a run of rows.

Reading is bounded by what a task needs: a ranged read stops after its last row and does not
parse the rows before its first; a JSONL line longer than MAX_MANIFEST_ROW_BYTES (with its
newline; CLIPBATCH_MAX_MANIFEST_ROW_BYTES) is an error row, skipped a block at a time. A row
that does not parse is a ``{BAD_ROW: reason}`` row: one bad line never fails its range.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Any, BinaryIO, Iterator

from clipbatch.core.storage import ObjectInfo

BAD_ROW = "__error__"  # a manifest row that could not be parsed: its reason, under this key
MAX_MANIFEST_ROW_BYTES = int(os.environ.get("CLIPBATCH_MAX_MANIFEST_ROW_BYTES") or 2 << 20)
_LINE_BUFFER = 1 << 16


class RawStream(io.RawIOBase):
    """Any object with ``read(n)`` (a file, botocore's StreamingBody) as a raw stream to buffer for lines."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._stream.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def iter_manifest(stream: BinaryIO, is_csv: bool, span: range | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a CSV (with a header) or JSONL manifest, streamed; a row that does not parse is a BAD_ROW row.

    With ``span``, only rows ``span.start`` to ``span.stop - 1`` are yielded, and reading stops after
    the last of them, so a ranged task holds its range, not the manifest. A JSONL line longer than
    MAX_MANIFEST_ROW_BYTES is a BAD_ROW row and is never held whole.
    """
    lines = io.BufferedReader(RawStream(stream), _LINE_BUFFER)
    rows = _csv_rows(lines) if is_csv else _jsonl_rows(lines, span.start if span is not None else 0)
    for index, row in enumerate(rows):
        if span is not None and index >= span.stop:
            return
        if span is None or index >= span.start:
            yield row


def _csv_rows(lines: BinaryIO) -> Iterator[dict[str, Any]]:
    reader = csv.DictReader(io.TextIOWrapper(lines, encoding="utf-8", errors="replace", newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over csv's size limit, a NUL byte: this row only
            yield {BAD_ROW: f"manifest line {reader.line_num + 1} is not valid CSV: {exc}"}  # counted once parsed
            continue
        if None in row:  # more fields than the header names
            yield {BAD_ROW: f"manifest line {reader.line_num} has more fields than the header"}
            continue
        yield row


def _jsonl_rows(lines: BinaryIO, skip: int) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL stream; the first ``skip`` rows are counted, not parsed (each yields an empty row)."""
    number, index = 0, 0
    while line := lines.readline(MAX_MANIFEST_ROW_BYTES + 1):
        number += 1
        too_long = len(line) > MAX_MANIFEST_ROW_BYTES
        while too_long and not line.endswith(b"\n") and line:
            line = lines.readline(MAX_MANIFEST_ROW_BYTES + 1)  # the rest of an over-long line, a block at a time
        if not too_long and not line.strip():
            continue
        index += 1
        if index <= skip:
            yield {}
        elif too_long:
            yield {BAD_ROW: f"manifest line {number} is longer than CLIPBATCH_MAX_MANIFEST_ROW_BYTES="
                            f"{MAX_MANIFEST_ROW_BYTES}"}
        else:
            yield _json_row(line, number)


def _json_row(line: bytes, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        return {BAD_ROW: f"manifest line {number} is not valid JSON: {exc}"}
    except RecursionError:
        return {BAD_ROW: f"manifest line {number} is not valid JSON: nested too deeply"}
    return row if isinstance(row, dict) else {BAD_ROW: f"manifest line {number} is not a JSON object"}


def manifest_is_csv(uri: str) -> bool:
    return uri.lower().endswith(".csv")


def rows_info(rows: list[dict[str, Any]]) -> ObjectInfo:
    """Size and ETag of a run of manifest rows: an edited row changes only its range's ETag."""
    digest, size = hashlib.sha1(), 0
    for row in rows:
        line = json.dumps(row, sort_keys=True, default=str).encode() + b"\n"
        digest.update(line)
        size += len(line)
    return ObjectInfo(size, digest.hexdigest())
