"""Pure compute: tensors in, arrays out. Knows nothing of Celery, Redis or storage."""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch

log = logging.getLogger("clipbatch.compute")
R = TypeVar("R")
# Autocast dtypes on CUDA. A CPU runs bf16 only where it has bf16 instructions (AVX512-BF16 or AMX,
# which oneDNN uses): on this project's AVX512-BF16 CPU ViT-B-32's image tower ran 1.6x fp32 and its
# text tower 1.5x (bench/throughput.py --precision); elsewhere bf16 is emulated and slower, so fp32.
CUDA_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, precision: str = "bf16") -> torch.dtype | None:
    """The dtype the forward autocasts to on ``device`` for CLIPBATCH_PRECISION ``precision``; None: fp32."""
    if device.type == "cuda":
        return CUDA_PRECISIONS[precision]
    return torch.bfloat16 if device.type == "cpu" and precision == "bf16" and cpu_has_bf16() else None


def effective_precision(device: torch.device, precision: str = "bf16") -> str:
    """What the forward really runs in: ``precision`` on CUDA; bf16 or fp32 on a CPU (see autocast_dtype)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[autocast_dtype(device, precision)]


def _autocast(device: torch.device, precision: str = "bf16"):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass(frozen=True)
class PixelNormalize:
    """torchvision's ToTensor + Normalize for a whole batch of uint8 HWC pixels at once.

    The same float operations in the same order as per image (so the same values, bit for
    bit), but one call per batch instead of several per image, and on the model's device:
    a CUDA worker copies uint8 pixels, a quarter of the float bytes.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2)  # NHWC -> NCHW; on CUDA this view is already channels_last
        x = x.contiguous() if x.device.type != "cuda" else x.contiguous(memory_format=torch.channels_last)
        x = x.to(torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return x.sub_(mean).div_(std)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def encode_images(model: torch.nn.Module, images: torch.Tensor, precision: str = "bf16",
                  normalize: PixelNormalize | None = None) -> np.ndarray:
    """Image embeddings of a batch, L2-normalised, float32 on the host (the image tower only).

    ``images`` are preprocessed float NCHW tensors, or uint8 NHWC pixels that ``normalize``
    turns into those on the model's device. On CUDA the inputs should come in pinned memory:
    the copy is then asynchronous.
    """
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("uint8 pixels need the model's PixelNormalize")
        images = normalize(images)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        img = model.encode_image(images)
    return l2_normalize(img.float()).cpu().numpy()


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokens: torch.Tensor, precision: str = "bf16") -> np.ndarray:
    """Text embeddings of a batch of tokenized captions, L2-normalised, float32 on the host (the text tower only)."""
    device = next(model.parameters()).device
    with _autocast(device, precision):
        txt = model.encode_text(tokens.to(device, non_blocking=True))
    return l2_normalize(txt.float()).cpu().numpy()


def encode_pairs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                 precision: str = "bf16", normalize: PixelNormalize | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of a batch of pairs (both towers; see encode_images and encode_texts)."""
    return encode_images(model, images, precision, normalize), encode_texts(model, tokens, precision)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class BatchLimit:
    """The largest forward batch this process has found to fit; halved on each out-of-memory."""

    size: int | None = None  # None: no limit found yet, whole batches go through

    def run(self, fn: Callable[[slice], R], n: int) -> list[R]:
        """Apply ``fn`` to consecutive slices covering ``range(n)``, as large as fit in memory.

        An out-of-memory error halves the slice and retries it; the smaller size is kept for
        the rest of the process's life, so only the first too-large batch pays for the probe.
        """
        out: list[R] = []
        start = 0
        while start < n:
            size = min(self.size or n, n - start)
            try:
                out.append(fn(slice(start, start + size)))
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or size == 1:
                    raise
                self.size = size // 2
                log.warning("out of memory at a forward batch of %d; retrying at %d", size, self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += size
        return out


def alignment_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity s(I,T) = f(I)·g(T) / (|f(I)| |g(T)|)."""
    img = img.astype(np.float32)
    txt = txt.astype(np.float32)
    num = np.einsum("ij,ij->i", img, txt)
    den = np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1)
    return num / np.maximum(den, 1e-12)
