"""Read webdataset tar shards as a stream of samples grouped by key.

A sample is the run of consecutive members sharing a key (the path up to the first dot of
the file name), as webdataset and img2dataset write them. Problems are reported per
sample, never raised: a damaged tar (a corrupt header anywhere, cut short, bytes after its end)
ends the stream with one error record naming the byte offsets, reading resumes after a corrupt
header, and anything one sample's bytes make its parsing or decoding raise becomes that sample's error.

Memory is bounded by caps, not by the input: a member is read only when its header's size is
within its cap (CLIPBATCH_MAX_MEMBER_BYTES for an image, CLIPBATCH_MAX_CAPTION_BYTES for the
``.txt``, CLIPBATCH_MAX_SIDECAR_BYTES for the ``.json``); a larger one makes its sample an error row
naming the cap, and the tar stream skips it in blocks. A compressed shard (gzip, bzip2, xz) is
inflated here a block at a time: tarfile's own stream decompression inflates a whole compressed
block at once (a 10 KiB block of zeros is 10 MiB). Members of extensions no one reads are not read.

Which members a job reads is a ``Members``: the image (any of IMAGE_EXTS, or the one extension
``--image-col`` names), the caption (``.txt``, the extension ``--caption-col`` names, or a field
of the json sidecar: ``json:FIELD``), and what its modality needs. A text-only job never reads an
image member; an image-only job keeps a caption that is there and does without one that is not.

An error reason is ``<category>: <details>``: the category (up to the first ':') is short and
fixed, since stats and metrics count errors by it, and no reason holds a memory address.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import re
import tarfile
import zlib
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipbatch.core.config import redact
from clipbatch.core.inputs import CAPTION_EXT, IMAGE_EXTS
from clipbatch.core.manifests import RawStream
from clipbatch.core.specs import JSON_FIELD_PREFIX
from clipbatch.workers.tarwalk import TarWalk

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
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
DEFAULT_MAX_CAPTION_BYTES = 64 << 10
DEFAULT_MAX_SIDECAR_BYTES = 1 << 20
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _env_bytes(name: str, default: int) -> int:
    """A positive byte cap from the environment, or ``default``; a bad value is refused at import."""
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{name}={value!r} is not a positive number of bytes")
    return int(value)


MAX_MEMBER_BYTES = _env_bytes("CLIPBATCH_MAX_MEMBER_BYTES", DEFAULT_MAX_MEMBER_BYTES)
MAX_CAPTION_BYTES = _env_bytes("CLIPBATCH_MAX_CAPTION_BYTES", DEFAULT_MAX_CAPTION_BYTES)
MAX_SIDECAR_BYTES = _env_bytes("CLIPBATCH_MAX_SIDECAR_BYTES", DEFAULT_MAX_SIDECAR_BYTES)


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
    image_hash: str | None = None  # content_hash of the image member's bytes (exact dedup)


def content_hash(data: bytes) -> str:
    """The ``image_hash`` metadata column: 128-bit BLAKE2b of the image bytes as read, in hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.0.jpg`` -> (``dir/abc``, ``0.jpg``), webdataset's key/extension rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, without memory addresses (reasons must be reproducible) or
    credentials (a URL's password or credential query parameters: reasons are stored and shown)."""
    return redact(_ADDRESS.sub("", f"{type(exc).__name__}: {exc}"))


def member_cap(ext: str) -> tuple[str, int]:
    """The environment variable naming the cap on a member with extension ``ext``, and its value."""
    if ext == CAPTION_EXT:
        return "CLIPBATCH_MAX_CAPTION_BYTES", MAX_CAPTION_BYTES
    if ext == META_EXT:
        return "CLIPBATCH_MAX_SIDECAR_BYTES", MAX_SIDECAR_BYTES
    return "CLIPBATCH_MAX_MEMBER_BYTES", MAX_MEMBER_BYTES


def over_cap(ext: str, size: int, name: str) -> str | None:
    """The error reason for a member of ``size`` bytes over its cap, or None when it fits."""
    var, cap = member_cap(ext)
    return f"member too large: {name} is {size} bytes, over {var}={cap}" if size > cap else None


@dataclass(frozen=True)
class Members:
    """The members a job reads from each sample, and which of them its modality needs."""

    modality: str = "pairs"
    image: str | None = None  # the image member's extension; None: the first of IMAGE_EXTS present
    caption: str | None = CAPTION_EXT  # the caption member's extension (None when it is a json field)
    caption_field: str | None = None  # the caption is this field of the json sidecar

    @classmethod
    def named(cls, modality: str, image_col: str | None, caption_col: str | None) -> Members:
        """A tar job's members: ``--image-col`` an extension, ``--caption-col`` an extension or json:FIELD."""
        if caption_col and caption_col.startswith(JSON_FIELD_PREFIX):
            return cls(modality, image_col and image_col.lower(), None, caption_col[len(JSON_FIELD_PREFIX):])
        return cls(modality, image_col and image_col.lower(), (caption_col or CAPTION_EXT).lower())

    def is_image(self, ext: str) -> bool:
        return ext == self.image if self.image else ext in IMAGE_EXTS

    def wanted(self, ext: str) -> bool:
        """Read this member? The caption and json always (metadata keeps them); images unless text-only."""
        if ext in (self.caption, META_EXT):
            return True
        return self.modality != "text" and self.is_image(ext)

    def cap_name(self, ext: str) -> str:
        """The extension whose cap applies to a member: a renamed caption is capped as a caption."""
        return CAPTION_EXT if ext == self.caption else ext

    def image_in(self, members: dict[str, bytes]) -> str | None:
        return next((e for e in ((self.image,) if self.image else IMAGE_EXTS) if e in members), None)


PAIRS = Members()


def iter_raw_samples(stream: BinaryIO, members: Members = PAIRS) -> Iterator[RawSample]:
    """Yield samples in tar order; a damaged tar ends with a RawSample keyed TRUNCATED_KEY naming the damage.

    A corrupt header is stepped over (workers/tarwalk.py): reading resumes at the next valid one, and
    a sample that lost a member to it (its name is the bad header's, or its members straddle the bad
    bytes) is an error. A key already seen in this tar is an error row for each later sample under it:
    the first keeps the key, so a key names one sample (the curation write stage looks samples up by key).
    A member over its cap is not read: its sample carries the reason and its later members are
    skipped. Members ``members`` does not want (an image, for a text-only job) are not read.
    """
    walk = TarWalk(_decompressed(stream))
    current: RawSample | None = None
    seen: set[str] = set()
    damage = 0  # walk.damage when current's last member was read
    failure = None
    try:
        for member in walk:
            key, ext = split_name(member.name)
            if current is not None and key != current.key:
                yield _checked(current, walk)
                current = None
            if current is None:
                current = RawSample(key, error=_duplicate(key, member.offset) if key in seen else None)
                seen.add(key)
            elif walk.damage != damage and current.error is None:
                current.error = f"tar member lost: bad tar data inside this sample, before byte {member.offset}"
            damage = walk.damage
            if current.error is None:
                wanted = members.wanted(ext)
                current.error = over_cap(members.cap_name(ext), member.size, member.name) if wanted else None
                current.members[ext] = walk.read(member) if wanted and not current.error else b""
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
        failure = describe(exc)
    if current is not None:
        yield _checked(current, walk)
    reason = walk.reason(failure)
    if reason:
        yield RawSample(TRUNCATED_KEY, error=reason)


def _duplicate(key: str, offset: int) -> str:
    return f"duplicate key: {key!r} again at byte {offset} of the tar (its first sample keeps the key)"


def _checked(sample: RawSample, walk: TarWalk) -> RawSample:
    """``sample``, an error if a corrupt header named one of its members."""
    if sample.error is None and any(split_name(name)[0] == sample.key for name in walk.names):
        sample.error = "tar member lost: a header of this sample is corrupt (see this shard's __shard__ row)"
    return sample


def _decompressed(stream: BinaryIO) -> BinaryIO:
    """The tar bytes of a plain or compressed shard, inflated in bounded reads."""
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(RawStream(stream))
    head = buffered.peek(6)[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(buffered)
    return lzma.LZMAFile(buffered) if head.startswith(b"\xfd7zXZ\x00") else buffered


def decode_sample(raw: RawSample, preprocess=None, draft_to: int | None = None, keep_jpeg: bool = False,
                  members: Members = PAIRS) -> Sample:
    """Decode what ``members`` says the job needs (image, caption, metadata); any problem becomes ``Sample.error``.

    ``draft_to`` is the model's input size: large JPEGs are decoded no larger than needed. With
    ``keep_jpeg``, a plain RGB or greyscale JPEG whose header passes the checks is left as bytes
    (``Sample.image``) for the device decoder. A text-only job's image is never opened.
    """
    if raw.error:
        return Sample(raw.key, error=raw.error)
    try:
        return _decode(raw, preprocess, draft_to, keep_jpeg, members)
    except Exception as exc:  # whatever one sample's bytes make a parser raise is that sample's error only
        return Sample(raw.key, error=f"sample undecodable: {describe(exc)}")


def _decode(raw: RawSample, preprocess, draft_to: int | None, keep_jpeg: bool, members: Members) -> Sample:
    """decode_sample's body; the expected problems get their own reasons here.

    A caption problem is the sample's error unless the job is image-only (its caption is then None).
    """
    image_ext = None
    if members.modality != "text":
        image_ext = members.image_in(raw.members)
        if image_ext is None:
            wanted = members.image or "/".join(IMAGE_EXTS)
            return Sample(raw.key, error=f"no image member ({wanted}); found {sorted(raw.members) or 'none'}")
    caption, error = (None, None) if members.caption is None else _caption_member(raw.members, members.caption)
    if error and members.modality != "image":
        return Sample(raw.key, error=error)
    meta, error = _json_member(raw.members)
    if error:
        return Sample(raw.key, error=error)
    if members.caption_field is not None:
        caption, error = _caption_field(meta, members.caption_field)
        if error and members.modality != "image":
            return Sample(raw.key, error=error)
    if image_ext is None:
        return Sample(raw.key, caption=caption, meta=meta)
    image, error = decode_image(raw.members[image_ext], image_ext, preprocess, draft_to, keep_jpeg)
    return Sample(raw.key, image=image, caption=caption, meta=meta, error=error,
                  image_hash=content_hash(raw.members[image_ext]))


def _caption_member(members: dict[str, bytes], ext: str) -> tuple[str | None, str | None]:
    """(caption, None) from member ``ext``, or (None, the reason there is none)."""
    if ext not in members:
        return None, f"no caption member (.{ext})"
    try:
        return members[ext].decode("utf-8").strip(), None
    except UnicodeDecodeError as exc:
        return None, f"caption is not valid UTF-8: {exc}"


def _caption_field(meta: dict | None, name: str) -> tuple[str | None, str | None]:
    """(caption, None) from field ``name`` of the json sidecar, or (None, the reason there is none)."""
    value = (meta or {}).get(name)
    if value is None or value == "":
        return None, f"no caption (json field {name!r} is empty or missing)"
    return (value if isinstance(value, str) else json.dumps(value)).strip(), None


def _json_member(members: dict[str, bytes]) -> tuple[dict | None, str | None]:
    """(metadata or None, None) from the json member, or (None, the reason it is unusable)."""
    if META_EXT not in members:
        return None, None
    try:
        meta = json.loads(members[META_EXT])
    except ValueError as exc:
        return None, f"json member is not valid JSON: {exc}"
    except RecursionError:
        return None, "json member is not valid JSON: nested too deeply"
    if not isinstance(meta, dict):
        return None, "json member is not a JSON object"
    return meta, None


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
        return None, f"image ({ext}) undecodable: {describe(exc)}"


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
        img = Image.fromarray(high_depth_to_uint8(np.asarray(img), sixteen_bit=img.mode != "I"))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def high_depth_to_uint8(pixels: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16-bit (or 32-bit integer) pixels scaled to uint8 in integer arithmetic, in place on one copy.

    floor(v * 255 / scale) for v clipped to [0, scale]; scale is 65535 for a 16-bit mode, and for
    Pillow's 32-bit mode "I" unless every value fits in 8 bits. About 4 bytes a pixel beside the
    input, where a float64 conversion took 8 bytes a pixel, twice over.
    """
    scale = 65535 if sixteen_bit or pixels.max() > 255 else 255
    # uint16 needs no clipping; Pillow's signed mode "I" does. Either dtype holds 65535 * 255.
    work = pixels.astype(np.uint32) if pixels.dtype.kind == "u" else np.clip(pixels, 0, scale)
    work *= 255
    work //= scale
    return work.astype(np.uint8)
