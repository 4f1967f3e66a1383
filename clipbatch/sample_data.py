"""Sample collections built from real photos shipped in the scikit-image, scikit-learn and
matplotlib wheels, written as webdataset shards (for the demo, tests and benchmarks)."""
from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path
from typing import Iterable

from PIL import Image

from clipbatch.workers.writers import write_tar

# (package, folder inside it, file names): real photographs, not synthetic test patterns.
PHOTO_SOURCES = (
    ("skimage", "data", ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                         "hubble_deep_field.jpg", "retina.jpg", "camera.png", "horse.png", "moon.png")),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
)


def find_photos() -> list[Path]:
    """Paths of the photos that the installed wheels ship (located without importing them)."""
    found: list[Path] = []
    for package, folder, names in PHOTO_SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0]) / folder
        found.extend(root / n for n in names if (root / n).is_file())
    if not found:
        raise RuntimeError("no sample photos found: pip install scikit-image scikit-learn matplotlib")
    return found


def caption_for(path: Path) -> str:
    return "a photo of " + path.stem.replace("_", " ").replace("left", "").strip()


def photo_sample(photo: Path, rng: random.Random, max_side: int = 512) -> dict[str, bytes]:
    """A JPEG variant (random crop and size) of a real photo, with a caption and metadata."""
    with Image.open(photo) as img:
        img = img.convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    meta = {"source": photo.name, "width": img.width, "height": img.height}
    return {"jpg": buf.getvalue(), "txt": caption_for(photo).encode(), "json": json.dumps(meta).encode()}


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples as a webdataset tar; returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        return write_tar(f, samples)


def corrupt_samples(prefix: str) -> list[tuple[str, dict[str, bytes], str]]:
    """Hostile samples of the kinds crawls contain, with the reason each must be recorded for."""
    html = b"<html><body>403 Forbidden</body></html>"
    return [
        (f"{prefix}_html", {"jpg": html, "txt": b"an error page"}, "image (jpg) undecodable"),
        (f"{prefix}_trunc", {"jpg": b"\xff\xd8\xff\xe0" + b"\0" * 64, "txt": b"cut short"}, "image (jpg) undecodable"),
        (f"{prefix}_nocap", {"jpg": b"", "json": b"{}"}, "no caption member"),
        (f"{prefix}_badtxt", {"png": b"", "txt": b"\xff\xfe\xfa"}, "caption is not valid UTF-8"),
    ]


def build_collection(folder: Path, shards: int, samples_per_shard: int, seed: int = 0,
                     corrupt_per_shard: int = 1) -> dict[str, int]:
    """Write ``shards`` tars of real-photo samples (plus some corrupt ones) into ``folder``."""
    rng = random.Random(seed)
    photos = find_photos()
    good = bad = 0
    for s in range(shards):
        samples = [(f"{s:05d}{i:04d}", photo_sample(photos[(s * samples_per_shard + i) % len(photos)], rng))
                   for i in range(samples_per_shard)]
        hostile = corrupt_samples(f"{s:05d}bad")[:corrupt_per_shard]
        samples.extend((key, members) for key, members, _ in hostile)
        write_shard(folder / f"{s:05d}.tar", samples)
        good += samples_per_shard
        bad += len(hostile)
    return {"shards": shards, "good": good, "corrupt": bad}


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 50, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")


def shape_classes() -> list[str]:
    """The synthetic collection's class captions, e.g. 'a red circle'."""
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def shape_image(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A coloured shape at a random place and size on a light, slightly noisy background."""
    from PIL import ImageDraw

    grey = rng.randint(200, 255)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = max(2, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img


def shape_collection(folder: Path | None, per_class: int, shards: int = 1, seed: int = 0):
    """Coloured shapes with captions: written as ``shards`` tars if ``folder`` is given.

    Returns (images, labels) with labels indexing ``shape_classes()``.
    """
    rng = random.Random(seed)
    classes = shape_classes()
    items = [(label, caption) for label, caption in enumerate(classes) for _ in range(per_class)]
    rng.shuffle(items)
    images = [shape_image(c.split()[1], c.split()[2], rng) for _, c in items]
    if folder is not None:
        per_shard = -(-len(items) // shards)
        for s in range(shards):
            chunk = range(s * per_shard, min(len(items), (s + 1) * per_shard))
            samples = []
            for i in chunk:
                buf = io.BytesIO()
                images[i].save(buf, "PNG")
                samples.append((f"{s:05d}{i:05d}", {"png": buf.getvalue(), "txt": items[i][1].encode()}))
            write_shard(folder / f"{s:05d}.tar", samples)
    return images, [label for label, _ in items]
