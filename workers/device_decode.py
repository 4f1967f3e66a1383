"""JPEG decode and preprocessing on the model's device (nvJPEG on CUDA), for when CPUs can't keep up.

Opt in with ``CLIPBATCH_DECODE=device``. The CPU still reads each image's header (pixel limit,
format) and decodes everything that is not a plain JPEG; JPEG bytes travel to the device and are
decoded there in one batched call, then resized (bicubic, antialiased, shorter side), centre-
cropped and normalised as open_clip's own eval transform does (tests/test_fast_decode.py holds
the result to cosine >= 0.995 against it). A JPEG the device cannot decode falls back to the CPU
path, which decodes it or records why not. On a CPU device the same code runs with torchvision's
CPU decoder, which is how it is tested here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class DevicePreprocess:
    """open_clip's eval transform (shortest-side bicubic resize, centre crop, normalise) on tensors."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(cls, cfg: dict[str, Any]) -> DevicePreprocess | None:
        """None when the model's preprocessing is one this path does not reproduce."""
        size = cfg.get("size")
        size = size if isinstance(size, int) else (size[0] if size and size[0] == size[1] else None)
        if size is None or cfg.get("interpolation", "bicubic") != "bicubic" or cfg.get("resize_mode", "shortest") != "shortest":
            return None
        return cls(int(size), tuple(cfg["mean"]), tuple(cfg["std"]))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """A uint8 CHW RGB image -> the model's float input."""
        image = F.resize(image, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = F.center_crop(image, [self.size, self.size])
        image = image.float().div_(255).clamp_(0, 1)
        return F.normalize(image, list(self.mean), list(self.std))


def decode_on_device(jpegs: list[bytes], preprocess: DevicePreprocess, device: torch.device) -> list[torch.Tensor | None]:
    """Decode and preprocess JPEGs on ``device``; None for each one that must go to the CPU path."""
    if not jpegs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad image fails the batched call: decode them one by one
        images = []
        for one in data:
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError:
                images.append(None)
    return [preprocess(img) if img is not None else None for img in images]
