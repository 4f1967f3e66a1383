"""Read webdataset tar shards as a stream of samples grouped by key.

A sample is the run of consecutive members sharing a key (the path up to the first dot of
the file name), as webdataset and img2dataset write them. Problems are reported per
sample, never raised: a truncated or corrupt tar ends the stream with one error record.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
META_EXT = "json"
TRUNCATED_KEY = "__shard__"
# Set deliberately: an image whose header claims more pixels is refused before decoding.
MAX_IMAGE_PIXELS = int(os.environ.get("CLIPBATCH_MAX_IMAGE_PIXELS", 100_000_000))
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# A large JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT domain) that keeps its
# shorter side at least this many times the model's input; the preprocessing's bicubic resize
# does the rest. 2 is Pillow's own reducing_gap: at 1 the result drifts visibly on textured
# photos (tests/test_fast_decode.py holds it to cosine >= 0.995 against the full decode).
DRAFT_REDUCING_GAP = 2


class ImageRefused(ValueError):
    """An image refused on its header alone (empty, or a decompression bomb)."""


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


def decode_sample(raw: RawSample, preprocess=None, draft_to: int | None = None, keep_jpeg: bool = False) -> Sample:
    """Decode image, caption and metadata; any problem becomes ``Sample.error``.

    ``draft_to`` is the model's input size: large JPEGs are decoded no larger than needed. With
    ``keep_jpeg``, a plain RGB or greyscale JPEG whose header passes the checks is left as bytes
    (``Sample.image``) for the device decoder.
    """
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
    image, error = decode_image(raw.members[image_ext], image_ext, preprocess, draft_to, keep_jpeg)
    return Sample(raw.key, image=image, caption=caption, meta=meta, error=error)


def decode_image(data: bytes, ext: str, preprocess=None, draft_to: int | None = None,
                 keep_jpeg: bool = False) -> tuple[object, str | None]:
    """(image, None), or (None, the reason the image cannot be used)."""
    try:
        img = open_checked(data)
        if keep_jpeg and img.format == "JPEG" and img.mode in ("RGB", "L"):
            return data, None
        image = open_rgb(data, draft_to, img)
        return (preprocess(image) if preprocess is not None else image), None
    except ImageRefused as exc:
        return None, f"image ({ext}) refused: {exc}"
    except Exception as exc:  # PIL raises many types for hostile bytes; the reason is kept
        return None, f"image ({ext}) undecodable: {type(exc).__name__}: {exc}"


def open_checked(data: bytes) -> Image.Image:
    """Open an image (header only), refusing empty files and decompression bombs."""
    if not data:
        raise ImageRefused("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageRefused(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:  # its message holds a memory address: keep reasons reproducible
            raise UnidentifiedImageError("not a recognised image format") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageRefused(f"decompression bomb: header claims {width}x{height} pixels, over {MAX_IMAGE_PIXELS}")
    return img


def open_rgb(data: bytes, draft_to: int | None = None, img: Image.Image | None = None) -> Image.Image:
    """Decode to an upright 8-bit RGB image, checking the pixel count before decoding.

    With ``draft_to``, a JPEG much larger than that is decoded in draft mode (see DRAFT_REDUCING_GAP).
    ``img`` is ``open_checked(data)`` when the caller has it already.
    """
    img = img if img is not None else open_checked(data)
    width, height = img.size
    keep = (draft_to or 0) * DRAFT_REDUCING_GAP
    if keep and img.format == "JPEG" and min(width, height) >= 2 * keep:  # else no 1/2^k step fits
        scale = keep / min(width, height)
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    img.load()
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Like open_clip's RGB conversion, but 16-bit images are scaled, not clipped to white."""
    if img.mode in _HIGH_DEPTH_MODES:
        scale = 65535 if img.mode != "I" or np.asarray(img).max() > 255 else 255
        img = Image.fromarray((np.asarray(img, dtype=np.float64) * (255 / scale)).clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")
