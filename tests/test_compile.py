"""The compiled forward (workers/compiled.py): outputs within cosine 0.999 of the eager model, one
compile per tower and batch size (a short batch is padded, its rows sliced back), compiled code
cached on disk under the worker's cache dir so a restarted worker loads it, and CLIPBATCH_COMPILE
deciding who compiles. No test here times anything: the bench measures speed."""
from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, service_env
from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec
from clipbatch.workers.compiled import CompiledTowers, compile_wanted
from clipbatch.workers.compute import BatchLimit, encode_images, encode_texts
from clipbatch.workers.embed import embed_shard
from clipbatch.workers.models import load_model, save_seeded_checkpoint

MIN_COSINE = 0.999
CPU = torch.device("cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def graphs_compiled() -> int:
    """FX graphs inductor produced or loaded so far in this process (one per compile)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]


def inputs(bundle, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 3, bundle.image_size, bundle.image_size, generator=g)
    tokens = bundle.tokenizer([f"a photo of thing {seed}-{i}" for i in range(rows)])
    return images, tokens


def check_agreement(bundle, towers, rows: int, seed: int) -> None:
    images, tokens = inputs(bundle, rows, seed)
    for encode, x in ((encode_images, images), (encode_texts, tokens)):
        eager, compiled = encode(bundle.model, x, "fp32"), encode(towers, x, "fp32")
        assert compiled.shape == eager.shape == (rows, bundle.embed_dim)
        assert cosines(eager, compiled).min() >= MIN_COSINE, (encode.__name__, rows)


@pytest.mark.slow
def test_compiled_tiny_model_agrees_with_eager_and_compiles_once_per_batch_size(checkpoint, tmp_path, monkeypatch):
    # given: the tiny model, its towers compiled for batches of 8, inductor's cache in a fresh folder
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    bundle = load_model(ModelSpec("clipbatch-tiny", str(checkpoint)), CPU)
    limit = BatchLimit()
    towers = CompiledTowers(bundle.model, 8, limit, threads=torch.get_num_threads())
    before = graphs_compiled()

    # when: full batches, short ones (padded) and a single row go through both towers
    for rows, seed in ((8, 0), (5, 1), (1, 2), (8, 3)):
        check_agreement(bundle, towers, rows, seed)

    # then: each tower compiled once, for 8 rows, and that cost was recorded
    assert graphs_compiled() - before == 2
    assert set(towers.compile_seconds) == {"image", "text"} and towers.cache["misses"] == 2
    assert not towers.failed and any((tmp_path / "inductor").rglob("*"))

    # and: after an out-of-memory left a limit of 4 rows, a batch of 6 runs as 4 + 2 (padded to 4)
    limit.size = 4
    images, _ = inputs(bundle, 6, 4)
    assert cosines(encode_images(bundle.model, images, "fp32"), encode_images(towers, images, "fp32")).min() >= MIN_COSINE
    assert towers.shape() == 4


@pytest.mark.slow
def test_compiled_vit_b32_agrees_with_eager(tmp_path, monkeypatch):
    # given: ViT-B-32 from a seeded random state (no download), compiled for batches of 4 (73 s on
    # 2 shared cores, compilation included)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = save_seeded_checkpoint("ViT-B-32", tmp_path / "vit-b-32.pt", seed=0)
    bundle = load_model(ModelSpec("ViT-B-32", str(path)), CPU)
    towers = CompiledTowers(bundle.model, 4, BatchLimit(), threads=torch.get_num_threads())

    # when / then: a full batch and a padded one agree with eager
    check_agreement(bundle, towers, 4, 0)
    check_agreement(bundle, towers, 3, 1)
    assert not towers.failed


@pytest.mark.parametrize("value, device, wanted", [
    ("1", "cpu", True), ("0", "cuda", False), ("auto", "cuda", True), ("auto", "cpu", False), (None, "cpu", False),
])
def test_who_compiles(value, device, wanted, monkeypatch):
    # auto: CUDA only (on 2 CPU cores the compiled task path measured slower, bench/results/2026-11-29-cpu.json)
    if value is None:
        monkeypatch.delenv("CLIPBATCH_COMPILE", raising=False)
    else:
        monkeypatch.setenv("CLIPBATCH_COMPILE", value)
    assert compile_wanted(torch.device(device)) is wanted


def test_a_bad_compile_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("CLIPBATCH_COMPILE", "yes")
    with pytest.raises(ValueError, match=r"CLIPBATCH_COMPILE='yes' is not one of auto, 1, 0"):
        compile_wanted(CPU)


def embeddings(folder, index: int) -> np.ndarray:
    return np.load(folder / "img_emb" / f"img_emb_{index}.npy").astype(np.float32)


def shard_stats(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "stats").glob("*.json"))]


@pytest.mark.integration
def test_a_worker_compiles_once_and_a_restarted_worker_loads_it_from_its_cache_dir(
        redis_url, photo_shards, checkpoint, tmp_path, start_worker, monkeypatch):
    # given: workers with CLIPBATCH_COMPILE=1 and a cache dir of their own
    folder, built = photo_shards
    cache = tmp_path / "cache"
    env = service_env(redis_url, CLIPBATCH_COMPILE="1", CLIPBATCH_CACHE_DIR=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    outputs = []
    for run in range(2):  # when: a first worker runs a job, then a second, new process runs another
        queue = f"compile-{uuid.uuid4().hex[:8]}"
        worker = start_worker(queue, env)
        out = tmp_path / f"out{run}"
        result = run_cli("submit", "embed", "--input", str(folder), "--output", str(out), "--model", "clipbatch-tiny",
                         "--pretrained", str(checkpoint), "--batch-size", "8", "--queue", queue, "--wait", "--json",
                         env=env)
        assert json.loads(result.stdout)["state"] == "succeeded", result.stderr + worker.log()[-3000:]
        worker.stop()
        outputs.append(out)

    # then: the first paid the compilation (cache misses), the restarted one loaded it (hits, no misses)
    first, second = shard_stats(outputs[0]), shard_stats(outputs[1])
    assert all(s["compiled"] and s["compiled_rows"] == 8 and not s["compile_failed"] for s in first + second)
    assert sum(s["compile_cache"]["misses"] for s in first) >= 2
    assert sum(s["compile_cache"]["hits"] for s in second) >= 2
    assert all(s["compile_cache"]["misses"] == 0 for s in second)
    assert any((cache / "inductor").rglob("*.py")), "inductor's cache is under CLIPBATCH_CACHE_DIR"

    # and: every shard's rows agree with the eager forward of the same shard
    spec = JobSpec(str(folder), str(tmp_path / "eager"), ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=8)
    monkeypatch.setenv("CLIPBATCH_COMPILE", "0")
    for index in range(built["shards"]):
        eager = embed_shard(ShardSpec("eager", index, str(folder / f"{index:05d}.tar"), spec), "eager")
        assert not json.loads(eager.files[f"stats/{index}.json"])["compiled"]
        rows = np.load(io.BytesIO(eager.files[f"img_emb/img_emb_{index}.npy"])).astype(np.float32)
        for out in outputs:
            assert cosines(rows, embeddings(out, index)).min() >= MIN_COSINE
