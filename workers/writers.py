"""Serialise one shard's results to bytes: npy embeddings, parquet tables, stats JSON.

Metadata column names: the system columns (RESERVED: key, caption, shard, clip_score, and any
``extra`` column a caller adds) are clipbatch's. A sample's json field keeps its name unless that
name is reserved, empty, or starts with ``json_``; then it is written as ``json_<name>`` (``key``
-> ``json_key``, ``json_key`` -> ``json_json_key``, ``""`` -> ``json_``). The rule is one-to-one
and never yields a reserved name, so no field can collide with another or with a system column.
Every parquet file is read back before its bytes are returned: a file its own readers could not
read (or with a duplicate column name) raises UnreadableOutput, so the shard does not commit.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.workers.fasttar import write_ustar

EMBEDDING_DTYPE = np.float16
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("shard", pa.string())])
ROW_COLUMNS = ("key", "caption", "shard")
# Columns clipbatch writes: a json field with one of these names (or starting with JSON_PREFIX) gets the prefix.
RESERVED = (*ROW_COLUMNS, "clip_score")
JSON_PREFIX = "json_"
FIXED_MTIME = 1_700_000_000  # reproducible tars


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=EMBEDDING_DTYPE))
    return buf.getvalue()


class UnreadableOutput(RuntimeError):
    """A file this writer produced that pyarrow cannot read back as written: the shard must not commit."""


def _parquet_bytes(table: pa.Table) -> bytes:
    """The table as zstd parquet, checked: unique column names, and pyarrow reads back every row."""
    dupes = sorted(n for n, count in Counter(table.column_names).items() if count > 1)
    if dupes:
        raise UnreadableOutput(f"parquet output would have duplicate columns {dupes}")
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    try:
        rows = pq.read_table(io.BytesIO(data)).num_rows
    except Exception as exc:
        raise UnreadableOutput(f"parquet output does not read back: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if rows != table.num_rows:
        raise UnreadableOutput(f"parquet output reads back as {rows} rows of {table.num_rows}")
    return data


def _cell(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def field_column(name: str, reserved: Iterable[str] = RESERVED) -> str:
    """The metadata column of a json field ``name`` (the module docstring's rule)."""
    if name in reserved or not name or name.startswith(JSON_PREFIX):
        return JSON_PREFIX + name
    return name


def _json_columns(metas: list[dict | None]) -> dict[str, pa.Array]:
    """Each json field as a column over all rows, in one pass over the fields the samples have."""
    found: dict[str, tuple[list[int], list[Any]]] = {}
    for row, meta in enumerate(metas):
        for name, value in (meta or {}).items():
            rows, values = found.setdefault(name, ([], []))
            rows.append(row)
            values.append(_cell(value))
    columns = {}
    for name in sorted(found):
        rows, values = found[name]
        try:
            present = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types across samples: keep them as text
            present = pa.array([None if v is None else str(v) for v in values], pa.string())
        where = np.full(len(metas), -1, np.int64)
        where[rows] = np.arange(len(rows))
        columns[name] = present.take(pa.array(where, mask=where < 0))  # spread to all rows, null where absent
    return columns


def metadata_bytes(rows: list[dict[str, Any]], metas: list[dict | None], extra: dict[str, list] | None = None) -> bytes:
    """One row per embedding row: key, caption, shard, the sample's json fields as columns, then ``extra``."""
    reserved = (*RESERVED, *(extra or {}))
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in ROW_COLUMNS]))
    for name, column in _json_columns(metas).items():
        table = table.append_column(field_column(name, reserved), column)
    for name, values in (extra or {}).items():
        table = table.append_column(name, pa.array(values))
    return _parquet_bytes(table)


def errors_bytes(errors: list[dict[str, str]]) -> bytes:
    return _parquet_bytes(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))


def json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def write_tar(fileobj, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples as a reproducible webdataset tar (tarfile's USTAR bytes, built
    directly: workers/fasttar.py); returns the count."""
    return write_ustar(fileobj.write, samples, FIXED_MTIME)
