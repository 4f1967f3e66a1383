"""Plan a job's input into shard tasks, whatever its format.

* webdataset: a tar, a brace pattern, or a folder/prefix of tars -> one task per tar;
* parquet: one task per file, or per run of row groups when --samples-per-shard is given;
* folder: images with sidecar .txt/.json, sorted by key, cut into runs of N samples (a text-only
  job's samples are the .txt captions, with or without an image beside them);
* manifest: JSONL or CSV rows (image path/URI, caption[, key]), cut into runs of N rows.

A ranged task's URI carries its range as a fragment (``data.jsonl#rows=0-10000``): that
string is the shard's identity in commit markers, so a rerun keeps its output index. Its
size and ETag are computed from what the task reads (the range's rows, or its files' sizes
and ETags) by the same functions here and in the worker, so only a changed range runs again.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from itertools import islice
from typing import BinaryIO

from braceexpand import braceexpand

from clipbatch.core.manifests import BAD_ROW, iter_manifest, manifest_is_csv, rows_info
from clipbatch.core.storage import (FILE_SCHEME, S3_SCHEME, ObjectInfo, StorageError, is_s3, join, open_storage,
                                   s3_client, split)
from clipbatch.core.specs import DEFAULT_SAMPLES_PER_INPUT_SHARD, JobSpec, SpecError

TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
MANIFEST_SUFFIXES = (".jsonl", ".csv")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image extensions, in the order a sample's member is picked
CAPTION_EXT = "txt"
DEFAULT_IMAGE_COL = "image"
DEFAULT_CAPTION_COL = "caption"
_RANGE_RE = re.compile(r"^(?P<base>.+)#(?P<unit>rows|row_groups)=(?P<start>\d+)-(?P<end>\d+)$")
_RANGE_BUFFER = 1 << 20
_SHOW_MISSING = 3


class InputError(ValueError):
    """An --input that names nothing readable."""


@dataclass(frozen=True)
class ShardInput:
    """One shard task as planned: its URI, and size/ETag to notice when it is rewritten."""

    uri: str
    size: int
    etag: str


@dataclass(frozen=True)
class FolderSample:
    """One sample of an image folder: its key (path without extension) and files by extension."""

    key: str
    files: dict[str, str]


def ranged(uri: str, unit: str, start: int, end: int) -> str:
    return f"{uri}#{unit}={start}-{end}"


def parse_range(uri: str) -> tuple[str, range | None]:
    """``x.jsonl#rows=0-100`` -> (``x.jsonl``, range(0, 100)); a plain URI has no range."""
    m = _RANGE_RE.match(uri)
    return (m["base"], range(int(m["start"]), int(m["end"]))) if m else (uri, None)


def _storage_errors(pattern: str, fn, *args):
    """Run a listing, turning storage failures into InputError naming the input."""
    try:
        return fn(*args)
    except (StorageError, FileNotFoundError) as exc:  # NoSuchBucket, AccessDenied, an unreachable endpoint, ...
        raise InputError(str(exc)) from None
    except PermissionError as exc:
        raise InputError(f"{pattern!r}: permission denied ({exc})") from None


def list_objects(pattern: str) -> tuple[list[ShardInput], bool]:
    """Every object a pattern names, sorted: (objects, whether it named a single object)."""
    if pattern.count("{") != pattern.count("}"):
        raise InputError(f"{pattern!r}: malformed brace pattern (unbalanced braces); e.g. 'shards/{{00000..00099}}.tar'")
    if "{" in pattern:
        return _storage_errors(pattern, _expand_braces, pattern), False
    return _storage_errors(pattern, _expand_plain, pattern)


def _expand_braces(pattern: str) -> list[ShardInput]:
    wanted = sorted(set(braceexpand(pattern)))
    # List the folder/prefix above the first brace once instead of probing every shard.
    base = pattern.split("{", 1)[0].rpartition("/")[0]
    storage = open_storage(base or ".")
    present = storage.list_info("")
    relative = [u[len(base) + 1:] if base else u for u in wanted]
    missing = [u for u, rel in zip(wanted, relative) if rel not in present]
    if missing:
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        shown = ", ".join(missing[:_SHOW_MISSING])
        raise InputError(f"{len(missing)} of {len(wanted)} shards do not exist: {shown}{more}")
    return [ShardInput(join(storage.uri, rel), present[rel].size, present[rel].etag) for rel in relative]


def _expand_plain(uri: str) -> tuple[list[ShardInput], bool]:
    try:
        parent, name = split(uri)
    except StorageError:  # a bucket root: list it
        parent, name = "", ""
    info = open_storage(parent).info(name) if name else None
    if info is not None:
        return [ShardInput(join(open_storage(parent).uri, name), info.size, info.etag)], True
    storage = open_storage(uri)
    found = storage.list_info("")
    return [ShardInput(join(storage.uri, k), i.size, i.etag) for k, i in sorted(found.items())], False


def expand_input(pattern: str) -> list[ShardInput]:
    """The tar shards a pattern names, sorted by URI; raise InputError if there are none."""
    return _tars(pattern, *list_objects(pattern))


def _tars(pattern: str, objects: list[ShardInput], single: bool) -> list[ShardInput]:
    shards = objects if single else _suffixed(objects, (TAR_SUFFIX,))
    if not shards:
        raise InputError(f"{pattern!r}: no {TAR_SUFFIX} shards there (give a shard, a brace pattern or a folder)")
    return shards


def _suffixed(objects: list[ShardInput], suffixes: tuple[str, ...]) -> list[ShardInput]:
    return [o for o in objects if o.uri.lower().endswith(suffixes)]


def sniff_format(objects: list[ShardInput], single: bool) -> str:
    """``auto``: a single file by its extension; a folder by what it holds (tar > parquet > manifest > images)."""
    if single:
        uri = objects[0].uri.lower()
        if uri.endswith(PARQUET_SUFFIX):
            return "parquet"
        return "manifest" if uri.endswith(MANIFEST_SUFFIXES) else "webdataset"
    for fmt, suffixes in (("webdataset", (TAR_SUFFIX,)), ("parquet", (PARQUET_SUFFIX,)),
                          ("manifest", MANIFEST_SUFFIXES)):
        if _suffixed(objects, suffixes):
            return fmt
    return "folder"


def plan_inputs(spec: JobSpec) -> tuple[str, list[ShardInput]]:
    """Resolve the input format and cut the input into shard tasks, sorted by URI.

    Raises InputError for an input that names nothing usable, SpecError for an option that
    does not fit it (naming the option).
    """
    objects, single = list_objects(spec.input)
    if not objects:
        raise InputError(f"{spec.input!r}: nothing there (give a shard, a brace pattern, a file or a folder)")
    fmt = spec.input_format if spec.input_format != "auto" else sniff_format(objects, single)
    _check_options_fit(spec, fmt)
    if fmt == "webdataset":
        return fmt, _tars(spec.input, objects, single)
    if fmt == "folder":
        if single or "{" in spec.input:
            raise InputError(f"{spec.input!r}: an image folder input is a folder or s3:// prefix")
        return fmt, _plan_folder(spec, objects)
    suffixes = (PARQUET_SUFFIX,) if fmt == "parquet" else MANIFEST_SUFFIXES
    files = objects if single else _suffixed(objects, suffixes)
    if not files:
        raise InputError(f"{spec.input!r}: no {' or '.join(suffixes)} files there")
    plan = _plan_parquet if fmt == "parquet" else _plan_manifest
    return fmt, [s for f in files for s in _storage_errors(f.uri, plan, spec, f)]


def _check_options_fit(spec: JobSpec, fmt: str) -> None:
    """Column options name columns of parquet and manifest rows, and member names of tars (not the key)."""
    names = {"webdataset": ("key_col",), "folder": ("image_col", "caption_col", "key_col")}.get(fmt, ())
    for name in names:
        if getattr(spec, name) is not None:
            where = "parquet, manifest and webdataset inputs" if name != "key_col" else "parquet and manifest inputs"
            raise SpecError(name, f"applies to {where}; {spec.input} is a {fmt} input")
    if fmt == "webdataset" and spec.samples_per_shard is not None:
        raise SpecError("samples_per_shard", f"applies to parquet, folder and manifest inputs; {spec.input} is tars")


def _check_column(option: str, column: str | None, columns: list[str], where: str, fmt: str) -> None:
    if column is not None and column not in columns:
        hint = "; or --input-format folder for the images beside it" if fmt == "parquet" else ""
        raise SpecError(option, f"no column {column!r} in {where} (columns: {', '.join(columns) or 'none'}){hint}")


def _check_columns(spec: JobSpec, columns: list[str], where: str, fmt: str) -> None:
    """The columns the job's modality reads must exist; one it does not need is checked only when named."""
    if spec.modality != "text" or spec.image_col is not None:
        _check_column("image_col", spec.image_col or DEFAULT_IMAGE_COL, columns, where, fmt)
    if spec.modality != "image" or spec.caption_col is not None:
        _check_column("caption_col", spec.caption_col or DEFAULT_CAPTION_COL, columns, where, fmt)
    _check_column("key_col", spec.key_col, columns, where, fmt)


# -- parquet ------------------------------------------------------------------------------


class _S3Range(io.RawIOBase):
    """A seekable S3 object read by ranged GETs: parquet reads its footer and chosen row groups only."""

    def __init__(self, uri: str, size: int) -> None:
        self.bucket, _, self.key = uri[len(S3_SCHEME):].partition("/")
        self.size, self.pos = size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        end = min(self.size, self.pos + len(buf))
        if end <= self.pos:
            return 0
        body = s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end - 1}")["Body"]
        data = body.read()
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_seekable(uri: str, size: int) -> BinaryIO:
    """A seekable binary file on a local path or an S3 object of ``size`` bytes."""
    if is_s3(uri):
        return io.BufferedReader(_S3Range(uri, size), buffer_size=_RANGE_BUFFER)
    return open(uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri, "rb")


def _plan_parquet(spec: JobSpec, file: ShardInput) -> list[ShardInput]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_seekable(file.uri, file.size) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file.uri}: not a readable parquet file ({exc})") from None
    _check_columns(spec, meta.schema.to_arrow_schema().names, file.uri, "parquet")
    if spec.samples_per_shard is None or meta.num_row_groups <= 1:
        return [file]
    shards, start, rows = [], 0, 0
    for group in range(meta.num_row_groups):
        rows += meta.row_group(group).num_rows
        if rows >= spec.samples_per_shard or group == meta.num_row_groups - 1:
            shards.append(ShardInput(ranged(file.uri, "row_groups", start, group + 1), file.size, file.etag))
            start, rows = group + 1, 0
    return shards


# -- manifests ----------------------------------------------------------------------------


def _plan_manifest(spec: JobSpec, file: ShardInput) -> list[ShardInput]:
    """Cut a manifest into runs of N rows, streaming it: the planner holds one run at a time."""
    parent, name = split(file.uri)
    n = spec.samples_per_shard or DEFAULT_SAMPLES_PER_INPUT_SHARD
    shards: list[ShardInput] = []
    checked = False
    with open_storage(parent).open_read(name) as stream:
        rows = iter_manifest(stream, manifest_is_csv(name))
        while chunk := list(islice(rows, n)):
            first = next((r for r in chunk if BAD_ROW not in r), None)
            if first is not None and not checked:
                _check_columns(spec, list(first), file.uri, "manifest")
                checked = True
            start = len(shards) * n
            info = rows_info(chunk)
            shards.append(ShardInput(ranged(file.uri, "rows", start, start + len(chunk)), info.size, info.etag))
    return shards


# -- image folders ------------------------------------------------------------------------


def folder_samples(infos: dict[str, ObjectInfo], modality: str = "pairs") -> list[FolderSample]:
    """Group a folder's files by path-without-extension, sorted by key. A group with an image is a
    sample; for a text-only job, a group with a caption is, and its image files are not its files
    (never read, and not part of its range's identity)."""
    groups: dict[str, dict[str, str]] = {}
    for rel in sorted(infos):
        stem, dot, ext = rel.rpartition(".")
        if not dot or not stem or "/" in ext or rel.rpartition("/")[2].startswith("."):
            continue
        groups.setdefault(stem, {})[ext.lower()] = rel
    if modality == "text":
        return [FolderSample(k, {e: r for e, r in f.items() if e not in IMAGE_EXTS})
                for k, f in sorted(groups.items()) if CAPTION_EXT in f]
    return [FolderSample(k, f) for k, f in sorted(groups.items()) if any(e in f for e in IMAGE_EXTS)]


def files_info(samples: list[FolderSample], infos: dict[str, ObjectInfo]) -> ObjectInfo:
    """Size and ETag of a run of folder samples, from their files' names, sizes and ETags."""
    digest, size = hashlib.sha1(), 0
    for sample in samples:
        for rel in sorted(sample.files.values()):
            info = infos[rel]
            digest.update(f"{rel}\0{info.size}\0{info.etag}\n".encode())
            size += info.size
    return ObjectInfo(size, digest.hexdigest())


def _plan_folder(spec: JobSpec, objects: list[ShardInput]) -> list[ShardInput]:
    root = open_storage(spec.input).uri
    infos = {o.uri[len(root) + 1:]: ObjectInfo(o.size, o.etag) for o in objects}  # the listing, relative to root
    samples = folder_samples(infos, spec.modality)
    if not samples:
        what = f"captions (.{CAPTION_EXT})" if spec.modality == "text" else f"images ({', '.join(IMAGE_EXTS)})"
        if spec.input_format == "auto":
            what = f"{TAR_SUFFIX} shards, {PARQUET_SUFFIX} files, {'/'.join(MANIFEST_SUFFIXES)} manifests or " + what
        raise InputError(f"{spec.input!r}: no {what} there")
    n = spec.samples_per_shard or DEFAULT_SAMPLES_PER_INPUT_SHARD
    shards = []
    for start in range(0, len(samples), n):
        chunk = samples[start:start + n]
        info = files_info(chunk, infos)
        shards.append(ShardInput(ranged(root, "rows", start, start + len(chunk)), info.size, info.etag))
    return shards
