"""Read webdataset tar shards as a stream of samples grouped by key.

A sample is the run of consecutive members sharing a key (the path up to the first dot of
the file name), as webdataset and img2dataset write them. Problems are reported per
sample, never raised: a truncated or corrupt tar ends the stream with one error record.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
META_EXT = "json"
TRUNCATED_KEY = "__shard__"


@dataclass
class RawSample:
    """The members of one sample, as bytes, before any decoding."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Sample:
    """A decoded sample, or the reason it could not be decoded."""

    key: str
    image: object = None  # a preprocessed tensor, or a PIL image
    caption: str | None = None
    meta: dict | None = None
    error: str | None = None


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.0.jpg`` -> (``dir/abc``, ``0.jpg``), webdataset's key/extension rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def iter_raw_samples(stream: BinaryIO) -> Iterator[RawSample]:
    """Yield samples in tar order; a broken tar ends with a RawSample carrying the error."""
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key)
                handle = tar.extractfile(member)
                current.members[ext] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if current is not None:
            yield current
            current = None
        yield RawSample(TRUNCATED_KEY, error=f"shard unreadable after this point: {type(exc).__name__}: {exc}")
    if current is not None:
        yield current


def decode_sample(raw: RawSample, preprocess=None) -> Sample:
    """Decode image, caption and metadata; any problem becomes ``Sample.error``."""
    if raw.error:
        return Sample(raw.key, error=raw.error)
    image_ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if image_ext is None:
        return Sample(raw.key, error=f"no image member ({'/'.join(IMAGE_EXTS)}); found {sorted(raw.members) or 'none'}")
    if CAPTION_EXT not in raw.members:
        return Sample(raw.key, error="no caption member (.txt)")
    try:
        caption = raw.members[CAPTION_EXT].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return Sample(raw.key, error=f"caption is not valid UTF-8: {exc}")
    meta = None
    if META_EXT in raw.members:
        try:
            meta = json.loads(raw.members[META_EXT])
        except ValueError as exc:
            return Sample(raw.key, error=f"json member is not valid JSON: {exc}")
        if not isinstance(meta, dict):
            return Sample(raw.key, error="json member is not a JSON object")
    try:
        with Image.open(io.BytesIO(raw.members[image_ext])) as img:
            img.load()
            image = img.convert("RGB")
        if preprocess is not None:
            image = preprocess(image)
    except Exception as exc:  # PIL raises many types for hostile bytes; the reason is kept
        return Sample(raw.key, error=f"image ({image_ext}) undecodable: {type(exc).__name__}: {exc}")
    return Sample(raw.key, image=image, caption=caption, meta=meta)
