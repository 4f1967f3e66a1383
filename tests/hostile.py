"""Hostile samples of the kinds crawled data contains, each with the outcome it must get.

Outcome ``None`` means the sample is embedded; a string is the start of its error reason.
"""
from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

from clipbatch.sample_data import find_photos, photo_sample


def _photo(size=(96, 64)) -> Image.Image:
    with Image.open(find_photos()[0]) as img:
        return img.convert("RGB").resize(size)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(_photo((80, 40)), "JPEG", exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    img = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(img, "PNG", transparency=0)


def _png16() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


def hostile_samples() -> list[tuple[str, dict[str, bytes], str | None]]:
    good_jpeg = photo_sample(find_photos()[0], random.Random(0))["jpg"]
    cap = b"a photo"
    return [
        ("truncated_jpeg", {"jpg": good_jpeg[: len(good_jpeg) // 2], "txt": cap}, "image (jpg) undecodable"),
        ("empty_file", {"jpg": b"", "txt": cap}, "image (jpg) refused: empty file"),
        ("html_as_jpg", {"jpg": b"<!doctype html><html>404</html>", "txt": cap}, "image (jpg) undecodable"),
        ("cmyk_jpeg", {"jpg": _encode(_photo().convert("CMYK"), "JPEG"), "txt": cap}, None),
        ("progressive_jpeg", {"jpg": _encode(_photo(), "JPEG", progressive=True), "txt": cap}, None),
        ("grayscale", {"jpg": _encode(_photo().convert("L"), "JPEG"), "txt": cap}, None),
        ("png_alpha", {"png": _encode(_photo().convert("RGBA"), "PNG"), "txt": cap}, None),
        ("palette_transparency", {"png": _palette_with_transparency(), "txt": cap}, None),
        ("png_16bit", {"png": _png16(), "txt": cap}, None),
        ("webp", {"webp": _encode(_photo(), "WEBP"), "txt": cap}, None),
        ("exif_rotated", {"jpg": _exif_rotated(), "txt": cap}, None),
        ("one_pixel", {"png": _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "txt": cap}, None),
        ("bomb", {"png": _png_bomb(), "txt": cap}, "image (png) refused: decompression bomb"),
        # 150 M pixels: past the limit, short of Pillow's own error at twice it (it only warns there)
        ("bomb_150mpx", {"png": _png_bomb(15000, 10000), "txt": cap}, "image (png) refused: decompression bomb: header"),
        ("no_caption", {"jpg": good_jpeg}, "no caption member"),
        ("caption_no_image", {"txt": cap}, "no image member"),
        ("bad_utf8", {"jpg": good_jpeg, "txt": b"caf\xe9 \xff"}, "caption is not valid UTF-8"),
        ("long_caption", {"jpg": good_jpeg, "txt": ("word " * 5000).encode()}, None),
        ("json_not_object", {"jpg": good_jpeg, "txt": cap, "json": b"[1, 2]"}, "json member is not a JSON object"),
        ("json_nested", {"jpg": good_jpeg, "txt": cap, "json": b"[" * 100_000},
         "json member is not valid JSON: nested too deeply"),
        ("json_system_names", {"jpg": good_jpeg, "txt": cap,
                               "json": b'{"clip_score": 9, "key": "x", "shard": 1, "caption": "y", "json_key": 2}'},
         None),
    ]
