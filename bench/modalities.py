"""Pairs vs image-only vs text-only on the same shards, and what embedding a repeated caption once
saves: the worker's task path (embed_shard, then the real commit) in interleaved rounds.

Run through ``python -m bench.throughput --modalities``. Two inputs of the same images (same seed): one
where every caption is distinct, one where every other caption is one of a few alt texts
("image", "photo", ...), as web collections repeat them.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from clipbatch.core import commit
from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec
from clipbatch.core.storage import open_storage
from clipbatch.sample_data import caption_for, find_photos, photo_sample, write_shard
from clipbatch.workers.embed import embed_shard

COMMON_CAPTIONS = ("image", "photo", "product image", "untitled")
# What each run embeds, on which input: (modality, repeated captions?)
RUNS = {"pairs": ("pairs", False), "image": ("image", False), "text": ("text", False),
        "pairs_repeated": ("pairs", True), "text_repeated": ("text", True)}


def build_caption_shards(folder: Path, shards: int, samples_per_shard: int, max_side: int,
                         repeated: bool, seed: int = 0) -> list[Path]:
    """Shards of real-photo variants; every caption distinct, or (``repeated``) every other one an alt text."""
    rng, photos = random.Random(seed), find_photos()
    paths = []
    for s in range(shards):
        samples = []
        for i in range(samples_per_shard):
            photo = photos[rng.randrange(len(photos))]
            members = photo_sample(photo, rng, max_side)
            n = s * samples_per_shard + i
            common = COMMON_CAPTIONS[n % len(COMMON_CAPTIONS)]
            members["txt"] = (common if repeated and i % 2 else f"{caption_for(photo)}, number {n}").encode()
            samples.append((f"{s:05d}{i:05d}", members))
        paths.append(folder / f"{s:05d}.tar")
        write_shard(paths[-1], samples)
    return paths


def run_task(model: ModelSpec, paths: list[Path], out: Path, modality: str, batch_size: int) -> dict[str, float]:
    """samples/s of the task path over ``paths`` in ``modality``, with its forward seconds and text-tower rows."""
    spec = JobSpec(str(paths[0].parent), str(out), model, batch_size=batch_size, input_format="webdataset",
                   modality=modality)
    storage = open_storage(str(out))
    good = captions = 0
    forward = 0.0
    start = time.perf_counter()
    for index, path in enumerate(paths):
        attempt = f"{modality}{index}"
        result = embed_shard(ShardSpec("bench", index, str(path), spec), attempt)
        commit.commit(storage, index, attempt, result.files, {"samples_ok": result.samples_ok})
        stats = json.loads(result.files[f"stats/{index}.json"])
        good, captions = good + result.samples_ok, captions + stats["captions_embedded"]
        forward += stats["seconds"]["forward"]
    return {"samples_per_s": good / (time.perf_counter() - start), "forward_s": forward, "samples": good,
            "captions_embedded": captions}


def compare_modalities(model: ModelSpec, work: Path, shards: int, samples_per_shard: int, max_side: int,
                       batch_size: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The five runs of RUNS in ``rounds`` interleaved rounds; medians, ratios and the dedup saving."""
    inputs = {repeated: build_caption_shards(work / ("repeated" if repeated else "distinct"), shards,
                                             samples_per_shard, max_side, repeated) for repeated in (False, True)}
    run_task(model, inputs[False][:1], work / "warm", "pairs", batch_size)  # load the model, warm the pools
    runs: dict[str, list[dict[str, float]]] = {key: [] for key in RUNS}
    for r in range(rounds):
        for key, (modality, repeated) in RUNS.items():
            runs[key].append(run_task(model, inputs[repeated], work / f"{key}{r}", modality, batch_size))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['samples_per_s']:.1f}/s" for k, v in runs.items()))
    rate = {k: round(statistics.median(x["samples_per_s"] for x in v), 2) for k, v in runs.items()}
    forward = {k: round(statistics.median(x["forward_s"] for x in v), 3) for k, v in runs.items()}
    return {
        "input": {"shards": shards, "samples_per_shard": samples_per_shard, "max_side": max_side,
                  "repeated": f"every other caption one of {len(COMMON_CAPTIONS)} alt texts"},
        "samples_per_s_median": rate,
        "samples_per_s_all": {k: [round(x["samples_per_s"], 2) for x in v] for k, v in runs.items()},
        "forward_s_median": forward,
        "captions_embedded": {k: v[0]["captions_embedded"] for k, v in runs.items()},
        "samples": {k: v[0]["samples"] for k, v in runs.items()},
        "ratios": {"image_over_pairs": round(rate["image"] / rate["pairs"], 3),
                   "text_over_pairs": round(rate["text"] / rate["pairs"], 3),
                   "pairs_repeated_over_pairs": round(rate["pairs_repeated"] / rate["pairs"], 3),
                   "text_repeated_over_text": round(rate["text_repeated"] / rate["text"], 3)},
        "caption_dedup_saving": {
            "text_forward_fraction_saved": round(1 - forward["text_repeated"] / forward["text"], 3),
            "pairs_time_fraction_saved": round(1 - rate["pairs"] / rate["pairs_repeated"], 3)},
    }
