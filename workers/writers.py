"""Serialise one shard's results to bytes: npy embeddings, parquet tables, stats JSON."""
from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBEDDING_DTYPE = np.float16
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("shard", pa.string())])
# Columns clipbatch writes; a json field with the same name is kept as ``json_<name>``.
RESERVED = ("key", "caption", "shard")
FIXED_MTIME = 1_700_000_000  # reproducible tars


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=EMBEDDING_DTYPE))
    return buf.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _cell(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def metadata_bytes(rows: list[dict[str, Any]], metas: list[dict | None], extra: dict[str, list] | None = None) -> bytes:
    """One row per embedding row: key, caption, shard, then the sample's json fields as columns."""
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in RESERVED]))
    fields = sorted({f for m in metas if m for f in m})
    for name in fields:
        values = [_cell(m.get(name)) if m else None for m in metas]
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: keep them as text
            column = pa.array([None if v is None else str(v) for v in values], pa.string())
        table = table.append_column(f"json_{name}" if name in RESERVED else name, column)
    for name, values in (extra or {}).items():
        table = table.append_column(name, pa.array(values))
    return _parquet_bytes(table)


def errors_bytes(errors: list[dict[str, str]]) -> bytes:
    return _parquet_bytes(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))


def json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def write_tar(fileobj, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples as a reproducible webdataset tar; returns the count."""
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count
