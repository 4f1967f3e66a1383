"""The JPEG draft-mode decode stays faithful to open_clip's preprocessing of the full decode."""
from __future__ import annotations

import io

import open_clip
import pytest
import torch
from PIL import Image

from workers.models import load_model
from workers.samples import find_photos
from workers.shards import DRAFT_REDUCING_GAP, open_rgb
from tasks.specs import ModelSpec

MIN_COSINE = 0.995


def jpeg_variants() -> list[tuple[str, bytes]]:
    """Every shipped photo as a JPEG at its own size and at 2x and 4x (as large crawl images are)."""
    out = []
    for path in find_photos():
        with Image.open(path) as img:
            img = img.convert("RGB")
        for factor in (1, 2, 4):
            buf = io.BytesIO()
            img.resize((img.width * factor, img.height * factor), Image.BICUBIC).save(buf, "JPEG", quality=90)
            out.append((f"{path.stem}x{factor}", buf.getvalue()))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize("size", [64, 224])
def test_draft_decode_matches_full_decode_after_preprocessing(size):
    # given open_clip's eval preprocessing at the model's input size
    preprocess = open_clip.image_transform(size, is_train=False)
    drafted = 0
    for name, data in jpeg_variants():
        # when a photo is decoded in full and in draft mode
        full, draft = open_rgb(data), open_rgb(data, draft_to=size)
        drafted += draft.size != full.size
        # then the draft is never below the reducing gap, and the model's inputs agree
        assert min(draft.size) >= min(min(full.size), size * DRAFT_REDUCING_GAP), name
        assert cosine(preprocess(full), preprocess(draft)) >= MIN_COSINE, name
    assert drafted >= 10, "the test photos must exercise the draft path"


def test_draft_decode_embeddings_match(checkpoint):
    # given the tiny model (64 px input: every test photo is drafted 1/2 to 1/8)
    bundle = load_model(ModelSpec("clipbatch-tiny", str(checkpoint)), torch.device("cpu"))
    variants = jpeg_variants()
    with torch.inference_mode():
        full = torch.stack([bundle.preprocess(open_rgb(d)) for _, d in variants])
        draft = torch.stack([bundle.preprocess(open_rgb(d, draft_to=bundle.image_size)) for _, d in variants])
        # when both are embedded, then each photo's two embeddings agree
        a, b = bundle.model.encode_image(full), bundle.model.encode_image(draft)
    sims = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert sims.min().item() >= MIN_COSINE, dict(zip((n for n, _ in variants), sims.tolist()))


def test_non_jpeg_and_small_images_are_decoded_in_full():
    png = io.BytesIO()
    Image.new("RGB", (2048, 2048), (10, 20, 30)).save(png, "PNG")
    assert open_rgb(png.getvalue(), draft_to=64).size == (2048, 2048)
    small = io.BytesIO()
    Image.new("RGB", (255, 300), (10, 20, 30)).save(small, "JPEG")
    assert open_rgb(small.getvalue(), draft_to=64).size == (255, 300)
