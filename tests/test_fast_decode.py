"""The fast decode paths (JPEG draft mode on the CPU, JPEG decode on the device) stay faithful to
open_clip's preprocessing of the full PIL decode."""
from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec
from clipbatch.workers.device_decode import DevicePreprocess, decode_on_device
from clipbatch.workers.embed import embed_shard
from clipbatch.workers.models import load_model, split_preprocess
from clipbatch.sample_data import build_collection, find_photos
from clipbatch.workers.samples import DRAFT_REDUCING_GAP, open_rgb

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


@pytest.mark.parametrize("size", [64, 224])
def test_batched_normalise_gives_open_clips_values_bit_for_bit(size):
    # given open_clip's eval preprocessing, split into per-image uint8 pixels and a per-batch normalise
    preprocess = open_clip.image_transform(size, is_train=False)
    pixels, normalize = split_preprocess(preprocess)
    images = [open_rgb(data, draft_to=size) for _, data in jpeg_variants()[::3]]
    # when a batch of real photos goes through both
    batch = normalize(torch.stack([pixels(img) for img in images]))
    # then every image's model input is exactly what the whole pipeline makes of it
    assert batch.dtype == torch.float32 and batch.shape == (len(images), 3, size, size) and batch.is_contiguous()
    for img, row in zip(images, batch):
        assert torch.equal(preprocess(img), row)


def test_a_pipeline_that_does_not_end_in_normalise_runs_whole():
    assert split_preprocess(open_clip.image_transform(64, is_train=False).transforms[:-1]) is None
    assert split_preprocess(lambda img: img) is None


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


@pytest.mark.parametrize("size", [64, 224])
def test_device_decode_path_matches_open_clip_preprocessing(size):
    # given the tensor path of CLIPBATCH_DECODE=device (run here with torchvision's CPU decoder)
    reference = open_clip.image_transform(size, is_train=False)
    on_device = DevicePreprocess.for_model({"size": (size, size), "mean": OPENAI_DATASET_MEAN,
                                            "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
                                            "resize_mode": "shortest"})
    variants = jpeg_variants()
    # when every photo goes through it in one batched call
    decoded = decode_on_device([d for _, d in variants], on_device, torch.device("cpu"))
    # then each image equals open_clip's own preprocessing of the full PIL decode
    for (name, data), image in zip(variants, decoded):
        assert image is not None and image.shape == (3, size, size), name
        assert cosine(image, reference(open_rgb(data))) >= MIN_COSINE, name


def test_device_decode_refuses_what_it_cannot_reproduce_and_hands_back_bad_jpegs():
    assert DevicePreprocess.for_model({"size": 224, "mean": (0,) * 3, "std": (1,) * 3, "interpolation": "bilinear"}) is None
    assert DevicePreprocess.for_model({"size": 224, "mean": (0,) * 3, "std": (1,) * 3, "resize_mode": "squash"}) is None
    good = jpeg_variants()[0][1]
    on_device = DevicePreprocess(64, (0.5,) * 3, (0.5,) * 3)
    out = decode_on_device([good, good[: len(good) // 3], good], on_device, torch.device("cpu"))
    assert out[0] is not None and out[2] is not None and torch.equal(out[0], out[2])
    assert out[1] is None or out[1].shape == (3, 64, 64)  # libjpeg may pad a truncated file; never raises


def test_a_shard_embeds_the_same_with_device_decode(checkpoint, tmp_path, monkeypatch):
    # given a shard of real photos with corrupt samples, embedded once on the default CPU path
    build_collection(tmp_path / "in", 1, 24, corrupt_per_shard=4)
    spec = JobSpec(str(tmp_path / "in"), str(tmp_path / "out"), ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=8)
    shard = ShardSpec("job", 0, str(tmp_path / "in" / "00000.tar"), spec)
    cpu = embed_shard(shard, "cpu")
    # when the same shard runs with CLIPBATCH_DECODE=device
    monkeypatch.setenv("CLIPBATCH_DECODE", "device")
    dev = embed_shard(shard, "dev")
    # then the photos were decoded on the device, the same samples are embedded or refused,
    # and the embeddings agree
    decoded = [json.loads(r.files["stats/0.json"])["images_decoded_on_device"] for r in (cpu, dev)]
    assert decoded == [0, 24]
    by_threads = json.loads(cpu.files["stats/0.json"])["cpu_forward_batches_by_threads"]
    assert sum(by_threads.values()) >= 3 and all(int(k) >= 1 for k in by_threads)
    for name in ("errors/errors_0.parquet", "metadata/metadata_0.parquet"):
        a, b = (pq.read_table(io.BytesIO(r.files[name])).drop_columns(["clip_score"] if "metadata" in name else [])
                for r in (cpu, dev))
        assert a.equals(b), name
    a, b = (torch.from_numpy(np.load(io.BytesIO(r.files["img_emb/img_emb_0.npy"])).astype(np.float32)) for r in (cpu, dev))
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).min().item() >= MIN_COSINE
