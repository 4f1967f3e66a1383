"""Pure compute: tensors in, arrays out. Knows nothing of Celery, Redis or storage."""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def encode_pairs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of a batch of pairs, L2-normalised, float32 on the host."""
    device = next(model.parameters()).device
    with _autocast(device):
        img = model.encode_image(images.to(device, non_blocking=True))
        txt = model.encode_text(tokens.to(device, non_blocking=True))
    return l2_normalize(img.float()).cpu().numpy(), l2_normalize(txt.float()).cpu().numpy()


def alignment_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity s(I,T) = f(I)·g(T) / (|f(I)| |g(T)|)."""
    img = img.astype(np.float32)
    txt = txt.astype(np.float32)
    num = np.einsum("ij,ij->i", img, txt)
    den = np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1)
    return num / np.maximum(den, 1e-12)
