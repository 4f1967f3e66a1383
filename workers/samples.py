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

from workers.writers import write_tar

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
