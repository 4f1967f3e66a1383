"""The forward's precision on a CPU (workers/compute.py): bf16 autocast where the CPU has bf16
instructions (the default, CLIPBATCH_PRECISION=bf16), fp32 where it has not or when asked, outputs
within cosine 0.999 of fp32, and a shard's stats saying which ran. No test here times anything:
bench/throughput.py measures the speed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipbatch.core.specs import ModelSpec
from clipbatch.workers import compute
from clipbatch.workers.compute import autocast_dtype, effective_precision, encode_images, encode_texts
from clipbatch.workers.models import load_model, save_seeded_checkpoint

MIN_COSINE = 0.999
CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not compute.cpu_has_bf16(), reason="this CPU has no bf16 instructions")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_cpu_autocasts_to_bf16_only_with_bf16_instructions(monkeypatch):
    # given: a CPU with bf16 instructions, then one without
    monkeypatch.setattr(compute, "cpu_has_bf16", lambda: True)
    # then: bf16 (the default) autocasts, fp32 and fp16 run fp32 (fp16 on a CPU is emulated)
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16 and effective_precision(CPU, "bf16") == "bf16"
    assert autocast_dtype(CPU, "fp32") is None and autocast_dtype(CPU, "fp16") is None
    monkeypatch.setattr(compute, "cpu_has_bf16", lambda: False)
    assert autocast_dtype(CPU, "bf16") is None and effective_precision(CPU, "bf16") == "fp32"
    # and: CUDA keeps what was asked, whatever the CPU has
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16


@needs_bf16
@pytest.mark.parametrize("model", ["clipbatch-tiny", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_bf16_on_the_cpu_agrees_with_fp32(model, tmp_path):
    # given: the model from a seeded random state (no download), a batch of random images and captions
    bundle = load_model(ModelSpec(model, str(save_seeded_checkpoint(model, tmp_path / "m.pt", seed=0))), CPU)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, bundle.image_size, bundle.image_size, generator=g)
    tokens = bundle.tokenizer([f"a photo of thing {i}, taken at dusk" for i in range(6)])

    # when: both towers run in fp32 and in the CPU's default precision
    pairs = [(encode(bundle.model, x, "fp32"), encode(bundle.model, x, "bf16"))
             for encode, x in ((encode_images, images), (encode_texts, tokens))]

    # then: bf16 really ran (the outputs differ) and stays within cosine 0.999 of fp32
    for fp32, bf16 in pairs:
        assert not np.array_equal(fp32, bf16)
        assert cosines(fp32, bf16).min() >= MIN_COSINE
