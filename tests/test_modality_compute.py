"""The compute of each modality, called directly: each tower runs only for what it needs, a caption
repeated in a shard is embedded once with the same bytes, and tar members are found by the names
--image-col / --caption-col give."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipbatch.core import layout
from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec
from clipbatch.sample_data import write_shard
from clipbatch.workers import embed, runtime, samples, writers
from clipbatch.workers.compute import encode_texts
from clipbatch.workers.models import load_model
from clipbatch.workers.readers import members_for, open_shard
from clipbatch.workers.samples import Sample, decode_sample
from tests.test_readers import HTML, photos

CAPTIONS = ["a cat", "a dog", "a cat", "image", "image", "a dog", "a bird", "image"]


@pytest.fixture(scope="module")
def bundle(checkpoint):
    return load_model(ModelSpec("clipbatch-tiny", str(checkpoint)), torch.device("cpu"))


class OneTower(torch.nn.Module):
    """The model with one tower that must not run: calling it fails the test."""

    def __init__(self, model: torch.nn.Module, banned: str) -> None:
        super().__init__()
        self.inner, self.banned = model, banned

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        assert self.banned != "image", "the image tower ran"
        return self.inner.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.banned != "text", "the text tower ran"
        return self.inner.encode_text(tokens)


def never(*_, **__):
    raise AssertionError("called")


def run_shard(tmp_path, monkeypatch, bundle, modality: str, items: list[tuple[str, dict[str, bytes]]]):
    """embed_shard on a tar of ``items`` with ``bundle`` as the process's model; the written files by role."""
    write_shard(tmp_path / "in.tar", items)
    monkeypatch.setattr(runtime, "model_for", lambda spec: bundle)
    job = JobSpec(str(tmp_path / "in.tar"), str(tmp_path / "out"), bundle.spec, batch_size=3,
                  input_format="webdataset", modality=modality)
    result = embed.embed_shard(ShardSpec("job", 0, job.input, job), "attempt")
    return result, {role: result.files.get(name) for role, name in layout.embed_files(0).items()}


def test_repeated_captions_are_embedded_once_with_the_bytes_of_embedding_each(bundle):
    # given a shard's samples in two batches, where half the captions repeat
    pixels = torch.randint(0, 256, (len(CAPTIONS), bundle.image_size, bundle.image_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    good = [Sample(f"k{i}", image=pixels[i], caption=c) for i, c in enumerate(CAPTIONS)]
    _, collate = embed.pipeline_steps(bundle)

    # when the worker's collate and forward run them
    cache: dict[str, np.ndarray] = {}
    batches = [collate(good[:4]), collate(good[4:])]
    txt = np.concatenate([embed.forward_batch(bundle, b, "pairs", cache, "fp32")[1] for b in batches])

    # then each distinct caption went through the text tower once
    assert [b.captions for b in batches] == [["a cat", "a dog", "image"], ["a bird"]]
    assert len(cache) == 4
    # and the rows written are byte for byte those of embedding every caption
    each = encode_texts(bundle.model, bundle.tokenizer(CAPTIONS), "fp32")
    assert writers.npy_bytes(txt) == writers.npy_bytes(each)


def test_image_only_never_runs_the_text_tower_or_the_tokenizer(tmp_path, monkeypatch, bundle):
    # given a model whose text tower and tokenizer fail if called, and a shard with and without captions
    images = photos(3, seed=7)
    blind = replace(bundle, model=OneTower(bundle.model, banned="text"), tokenizer=never)
    items = [("a", {"jpg": images[0], "txt": b"a cat", "json": b'{"clip_score": 9}'}), ("b", {"jpg": images[1]}),
             ("c", {"jpg": images[2], "txt": b"\xff\xfe"}), ("d", {"txt": b"no image"})]

    # when the shard is embedded image-only
    result, files = run_shard(tmp_path, monkeypatch, blind, "image", items)

    # then: image embeddings and metadata (captions where there were), no text, no scores
    assert (result.samples_ok, result.samples_failed) == (3, 1)
    assert files["text"] is None and np.load(io.BytesIO(files["img"])).shape == (3, bundle.embed_dim)
    meta = pq.read_table(io.BytesIO(files["metadata"])).to_pylist()
    assert [(m["key"], m["caption"]) for m in meta] == [("a", "a cat"), ("b", None), ("c", None)]
    assert "clip_score" not in meta[0] and meta[0]["json_clip_score"] == 9  # a system column stays reserved
    assert json.loads(files["stats"])["modality"] == "image" and "clip_score" not in json.loads(files["stats"])


def test_text_only_never_opens_an_image(tmp_path, monkeypatch, bundle):
    # given a model whose image tower fails if called, and image decoding that fails if reached
    blind = replace(bundle, model=OneTower(bundle.model, banned="image"), preprocess=never)
    monkeypatch.setattr(samples, "decode_image", never)
    items = [("a", {"jpg": HTML, "txt": b"a cat"}), ("b", {"txt": b"a cat"}), ("c", {"png": b"x"})]

    # when the shard is embedded text-only
    result, files = run_shard(tmp_path, monkeypatch, blind, "text", items)

    # then every caption is a row (the broken image was never read), the captionless sample an error
    assert (result.samples_ok, result.samples_failed) == (2, 1)
    assert files["img"] is None
    txt = np.load(io.BytesIO(files["text"]))
    assert txt.shape == (2, bundle.embed_dim) and txt[0].tobytes() == txt[1].tobytes()
    errors = pq.read_table(io.BytesIO(files["errors"])).to_pylist()
    assert errors == [{"key": "c", "reason": "no caption member (.txt)", "shard": str(tmp_path / "in.tar")}]
    assert json.loads(files["stats"])["captions_embedded"] == 1


@pytest.mark.parametrize(("options", "members", "expected"), [
    ({"caption_col": "caption"}, {"jpg": 0, "caption": b"from .caption", "txt": b"not this"}, "from .caption"),
    ({"caption_col": "json:caption"}, {"jpg": 0, "json": b'{"caption": "from json"}'}, "from json"),
    ({"image_col": "png", "caption_col": "CAPTION"}, {"jpg": HTML, "png": 1, "caption": b"the png"}, "the png"),
])
def test_tar_members_are_found_by_the_names_the_options_give(tmp_path, options, members, expected):
    # given a tar whose members are named as the options say (images by index into real photos)
    images = photos(2, seed=8)
    sample = {ext: images[v] if isinstance(v, int) else v for ext, v in members.items()}
    write_shard(tmp_path / "in.tar", [("k", sample), ("bare", {"jpg": images[0]})])
    job = JobSpec(str(tmp_path / "in.tar"), "/unused", ModelSpec("clipbatch-tiny"), input_format="webdataset",
                  **options)

    # when read and decoded as the job decodes
    _, source = open_shard(job.input, job)
    with source as raws:
        decoded = {s.key: s for s in (decode_sample(r, members=members_for(job)) for r in raws)}

    # then the caption and image come from the named members; a sample without them is an error row
    assert decoded["k"].error is None and decoded["k"].caption == expected
    assert decoded["bare"].error.startswith(("no caption", "no image member (png)"))
