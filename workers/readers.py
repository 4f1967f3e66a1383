"""Read one shard task's input as RawSamples, whatever its format.

Every format yields the same ``RawSample(key, members={ext: bytes})`` a webdataset tar does
(image bytes under their extension, ``txt`` caption, ``json`` metadata), so all of them share
``decode_sample``'s per-sample errors: a row whose image cannot be read, or whose image or
caption is empty, becomes a RawSample carrying the reason, and the shard still completes; so does
anything else one row makes its conversion raise. What a row must have follows the job's
modality: a text-only job never reads (or fetches) an image, an image-only job needs no caption.
The member caps of workers/samples.py hold here too: an image, caption or json over its cap is
an error row, and a file or URI is read no further than its cap allows. A manifest range is read
up to its last row and no further.
Planning (core/inputs.py) and reading compute a ranged shard's size/ETag with the
same functions, so the commit marker records exactly what was read.
"""
from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import PurePosixPath
from typing import Any, Callable, ContextManager, Iterable, Iterator

from clipbatch.core.config import redact
from clipbatch.core.confine import InputRefused, confine, open_confined
from clipbatch.core.inputs import (DEFAULT_CAPTION_COL, DEFAULT_IMAGE_COL, IMAGE_EXTS, FolderSample, files_info,
                                  folder_samples, open_seekable, parse_range)
from clipbatch.core.manifests import BAD_ROW, iter_manifest, manifest_is_csv, rows_info
from clipbatch.core.storage import ObjectInfo, Storage, is_s3, join, open_storage, split
from clipbatch.core.specs import JobSpec
from clipbatch.workers.samples import (CAPTION_EXT, META_EXT, Members, RawSample, describe, iter_raw_samples,
                                      member_cap, over_cap)

# Images named by path/URI are fetched this many at a time, in order (S3 latency hides behind threads).
FETCH_THREADS = 16
FETCH_CHUNK = 64
PARQUET_BATCH_ROWS = 256
READ_CHUNK = 1 << 20
_MAGIC = ((b"\x89PNG", "png"), (b"RIFF", "webp"))

Source = tuple[ObjectInfo, ContextManager[Iterator[RawSample]]]


@dataclass(frozen=True)
class Columns:
    """Which row fields hold the image (bytes or a path/URI), the caption and the key; what the modality reads."""

    image: str
    caption: str
    key: str | None
    modality: str = "pairs"

    @classmethod
    def of(cls, job: JobSpec) -> Columns:
        return cls(job.image_col or DEFAULT_IMAGE_COL, job.caption_col or DEFAULT_CAPTION_COL, job.key_col,
                   job.modality)


def members_for(job: JobSpec) -> Members:
    """The members a job decodes: tars by the names ``--image-col``/``--caption-col`` give, every
    other format as this module writes its RawSamples (image by its type, ``txt``, ``json``)."""
    if job.input_format == "webdataset":
        return Members.named(job.modality, job.image_col, job.caption_col)
    return Members(job.modality)


def open_shard(uri: str, job: JobSpec) -> Source:
    """The input's size/ETag (for the marker) and a context manager over its samples, in order.

    Raises FileNotFoundError when the input itself is gone (the shard task is then retried).
    """
    readers = {"parquet": _parquet, "manifest": _manifest, "folder": _folder}
    return readers.get(job.input_format, _tar)(uri, job)


def _info(uri: str) -> tuple[Storage, str, ObjectInfo]:
    parent, name = split(uri)
    storage = open_storage(parent)
    info = storage.info(name)
    if info is None:
        raise FileNotFoundError(f"input shard {uri} does not exist")
    return storage, name, info


def _tar(uri: str, job: JobSpec) -> Source:
    storage, name, info = _info(uri)

    @contextlib.contextmanager
    def samples() -> Iterator[Iterator[RawSample]]:
        with storage.open_read(name) as stream:
            # a zero-byte shard holds no samples
            yield iter_raw_samples(stream, members_for(job)) if info.size else iter(())

    return info, samples()


def _parquet(uri: str, job: JobSpec) -> Source:
    import pyarrow.parquet as pq

    base, groups = parse_range(uri)
    _, _, info = _info(base)
    stem = PurePosixPath(base).stem

    def rows(pf) -> Iterator[tuple[str, dict[str, Any]]]:
        chosen = list(groups) if groups is not None else list(range(pf.num_row_groups))
        number = sum(pf.metadata.row_group(g).num_rows for g in range(chosen[0])) if chosen else 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=chosen):
            for row in batch_rows(batch):
                yield f"{stem}/{number:07d}", row
                number += 1

    @contextlib.contextmanager
    def samples() -> Iterator[Iterator[RawSample]]:
        with open_seekable(base, info.size) as f:
            yield row_samples(rows(pq.ParquetFile(f)), Columns.of(job), split(base)[0])

    return info, samples()


def batch_rows(batch) -> list[dict[str, Any]]:
    """A record batch as Python rows; a row Arrow cannot convert (a date out of Python's range) is a BAD_ROW row."""
    try:
        return batch.to_pylist()
    except Exception:  # find the row(s) at fault; the others convert as usual
        return [_one_row(batch, i) for i in range(batch.num_rows)]


def _one_row(batch, i: int) -> dict[str, Any]:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except Exception as exc:
        return {BAD_ROW: f"row unreadable: {describe(exc)}"}


def _manifest(uri: str, job: JobSpec) -> Source:
    base, span = parse_range(uri)
    storage, name, _ = _info(base)
    with storage.open_read(name) as stream:
        rows = list(iter_manifest(stream, manifest_is_csv(name), span))  # stops after the range's last row
    start = span.start if span is not None else 0
    stem = PurePosixPath(name).stem
    keyed = [(f"{stem}/{start + i:07d}", row) for i, row in enumerate(rows)]
    return rows_info(rows), contextlib.nullcontext(row_samples(iter(keyed), Columns.of(job), split(base)[0]))


def _folder(uri: str, job: JobSpec) -> Source:
    base, span = parse_range(uri)
    storage = open_storage(base)
    infos = storage.list_info("")
    samples = folder_samples(infos, job.modality)
    samples = samples[span.start:span.stop] if span is not None else samples

    def read(sample: FolderSample) -> RawSample:
        members = {}
        for ext, rel in sample.files.items():
            too_large = over_cap(ext, infos[rel].size, join(storage.uri, rel))
            if too_large:
                return RawSample(sample.key, error=too_large)
            try:
                members[ext] = read_capped(storage, rel, ext, root=storage.uri)
            except InputRefused as exc:
                return RawSample(sample.key, error=f"input refused: {rel!r} {exc}")
            except MemberTooLarge as exc:  # grown since planning
                return RawSample(sample.key, error=str(exc))
            except Exception as exc:  # gone since planning, unreadable: this sample's error only
                return RawSample(sample.key, error=f"file unreadable: {join(storage.uri, rel)}: {describe(exc)}")
        return RawSample(sample.key, members)

    return files_info(samples, infos), contextlib.nullcontext(_fetched(samples, read))


def _fetched(items: Iterable[Any], fn: Callable[[Any], RawSample]) -> Iterator[RawSample]:
    """``fn`` over ``items`` in order, FETCH_CHUNK at a time on FETCH_THREADS threads."""
    it = iter(items)
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        while chunk := list(islice(it, FETCH_CHUNK)):
            yield from pool.map(fn, chunk)


def row_samples(rows: Iterator[tuple[str, dict[str, Any]]], cols: Columns, base_dir: str) -> Iterator[RawSample]:
    """(key, row) pairs of a parquet file or manifest -> RawSamples; relative paths are under ``base_dir``."""
    return _fetched(rows, lambda item: row_sample(item[0], item[1], cols, base_dir))


def row_sample(key: str, row: dict[str, Any], cols: Columns, base_dir: str) -> RawSample:
    """One row as a RawSample: image bytes (given, or read from its path/URI), caption, other fields as json."""
    try:
        return _row_sample(key, row, cols, base_dir)
    except Exception as exc:  # whatever one row's values make the conversion raise is that row's error only
        return RawSample(key, error=f"row unreadable: {describe(exc)}")


def _row_sample(key: str, row: dict[str, Any], cols: Columns, base_dir: str) -> RawSample:
    """row_sample's body; the expected problems get their own reasons here (checked before any fetch)."""
    if BAD_ROW in row:
        return RawSample(key, error=row[BAD_ROW])
    if cols.key and row.get(cols.key) not in (None, ""):
        key = str(row[cols.key])
    image = None
    if cols.modality != "text":
        image = row.get(cols.image)
        if isinstance(image, dict):  # a Hugging Face datasets Image column: {bytes, path}
            image = image.get("bytes") or image.get("path")
        if image in (None, b"", ""):
            return RawSample(key, error=f"no image (column {cols.image!r} is empty or missing)")
    caption = row.get(cols.caption)
    if caption in (None, "") and cols.modality != "image":
        return RawSample(key, error=f"no caption (column {cols.caption!r} is empty or missing)")
    members: dict[str, bytes] = {}
    if image is not None:
        found = _row_image(image, cols, base_dir)
        if isinstance(found, str):
            return RawSample(key, error=found)
        members[found[0]] = found[1]
    if caption not in (None, ""):
        members[CAPTION_EXT] = str(caption).encode()
    extra = {k: v for k, v in row.items() if k not in (cols.image, cols.caption, cols.key)
             and not isinstance(v, (bytes, bytearray))}
    if extra:
        members[META_EXT] = json.dumps(extra, default=str).encode()
    too_large = next((r for e, d in members.items() if (r := over_cap(e, len(d), f"{key}.{e}"))), None)
    return RawSample(key, error=too_large) if too_large else RawSample(key, members)


def _row_image(image: Any, cols: Columns, base_dir: str) -> tuple[str, bytes] | str:
    """(extension, bytes) of a row's image, given or read from its path/URI; or the reason it cannot be had."""
    if isinstance(image, str):
        try:
            uri, root = confine(image, base_dir)
            data = read_uri(uri, root)
        except InputRefused as exc:  # the rule broken, with the row's own value, not where a link leads
            return f"input refused: {redact(image)!r} {exc}"
        except MemberTooLarge as exc:
            return str(exc)
        except Exception as exc:  # missing file, no such key, no access: this sample's error only
            return f"image unreadable: {uri}: {describe(exc)}"
        ext = uri.rpartition(".")[2].lower()
    elif isinstance(image, (bytes, bytearray)):
        data, ext = bytes(image), ""
    else:
        return f"column {cols.image!r} holds {type(image).__name__}, not image bytes or a path"
    return (ext if ext in IMAGE_EXTS else sniff_ext(data)), data


def read_uri(uri: str, root: str) -> bytes:
    """An image named by a row (confined under ``root``), read no further than the member cap."""
    parent, name = split(uri)
    return read_capped(open_storage(parent), name, uri.rpartition(".")[2].lower(), root=root)


class MemberTooLarge(ValueError):
    """A file over its member cap; its message is the sample's error reason."""


def read_capped(storage: Storage, name: str, ext: str, root: str) -> bytes:
    """A file's bytes, read in chunks to at most one byte past the cap for ``ext`` (MemberTooLarge past it).

    A local file is opened confined under ``root`` (open_confined: no symlink out, regular files only).
    Chunks, not one ``read(cap + 1)``: a file object allocates the whole size asked for up front.
    """
    var, cap = member_cap(ext)
    chunks, total = [], 0
    local = not is_s3(storage.uri)
    with (open_confined(join(storage.uri, name), root) if local else storage.open_read(name)) as stream:
        while chunk := stream.read(min(READ_CHUNK, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
    if total > cap:
        raise MemberTooLarge(f"member too large: {join(storage.uri, name)} is over {var}={cap} bytes")
    return b"".join(chunks)


def sniff_ext(data: bytes) -> str:
    """The image member name for bytes of unknown type (decode_sample names it in its reasons)."""
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "jpg")

