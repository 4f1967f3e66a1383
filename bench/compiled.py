"""Eager vs compiled forward (workers/compiled.py) on the same shards and weights, in interleaved rounds.

Run through ``python -m bench.throughput --compile``. Each round measures, in turn: the model alone on
pre-made tensors eager and compiled, and the worker's task path (embed_shard + commit) with
CLIPBATCH_COMPILE=0 and =1. Compilation is paid before the rounds and reported: by a fresh process
with an empty inductor cache (a new worker), by a second one that finds the cache the first filled
(a restarted worker), and in the bench's own process.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from clipbatch.core.specs import JobSpec
from clipbatch.workers import runtime
from clipbatch.workers.compiled import describe

# A fresh process: load the model, build the compiled towers, call each once; print what it cost.
_RESTART_PROBE = """
import json, sys, torch
from clipbatch.core.specs import ModelSpec
from clipbatch.workers import runtime
from clipbatch.workers.compiled import describe
from clipbatch.workers.compute import encode_pairs
runtime.configure_threads()
bundle = runtime.model_for(ModelSpec(sys.argv[1], sys.argv[2]))
rows = int(sys.argv[3])
towers = runtime.towers_for(bundle, rows)
images = torch.randn(rows, 3, bundle.image_size, bundle.image_size)
encode_pairs(towers, images, bundle.tokenizer(["a photo"] * rows), runtime.precision())
print(json.dumps(describe(towers)))
"""


def restart_cost(spec: JobSpec, batch_size: int) -> dict[str, Any]:
    """What compiling costs a fresh process with CLIPBATCH_COMPILE=1 and this process's inductor cache dir."""
    env = {**os.environ, "CLIPBATCH_COMPILE": "1"}
    done = subprocess.run([sys.executable, "-c", _RESTART_PROBE, spec.model.name, spec.model.pretrained or "",
                           str(batch_size)], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_compile(spec: JobSpec, paths: list[Path], work: Path, batch_size: int, rounds: int, good: int,
                    model_bound: Callable[..., float], task_path: Callable[..., tuple[float, dict[str, float]]],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Medians of eager and compiled, model-only and task path, their ratios, and the compile cost."""
    bundle = runtime.model_for(spec.model)
    captions = [f"a photo of sample {i}" for i in range(64)]
    first = restart_cost(spec, batch_size)  # a new worker with an empty cache: compiles, fills the cache
    log(f"compiled in a first fresh process: {first}")
    restarted = restart_cost(spec, batch_size)  # a restarted worker: finds the cache
    log(f"compiled in a second fresh process: {restarted}")
    os.environ["CLIPBATCH_COMPILE"] = "1"
    towers = runtime.towers_for(bundle, batch_size)
    model_bound(bundle, batch_size, batch_size, captions, towers)  # compiles both towers (or loads them)
    compiled_here = describe(towers)
    log(f"compiled in this process: {compiled_here}")
    for flag in ("0", "1"):  # warm the task path both ways before timing
        os.environ["CLIPBATCH_COMPILE"] = flag
        task_path(spec, paths[:1], work / f"warm-compile{flag}")
    runs: dict[str, list[float]] = {k: [] for k in ("model_eager", "model_compiled", "task_eager", "task_compiled")}
    for r in range(rounds):
        runs["model_eager"].append(model_bound(bundle, batch_size, good, captions))
        runs["model_compiled"].append(model_bound(bundle, batch_size, good, captions, towers))
        for flag, name in (("0", "task_eager"), ("1", "task_compiled")):
            os.environ["CLIPBATCH_COMPILE"] = flag
            runs[name].append(task_path(spec, paths, work / f"out-{name}-{r}")[0])
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in runs.items()))
    os.environ.pop("CLIPBATCH_COMPILE")
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    # The same ratios per round (each round's four runs are side by side), then their median.
    per_round = {name: [a / b for a, b in zip(runs[x], runs[y])] for name, (x, y) in RATIOS.items()}
    return {
        "samples_per_s_median": med,
        "samples_per_s_all": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "ratios_median_of_rounds": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "ratios_all": {k: [round(x, 3) for x in v] for k, v in per_round.items()},
        "compile_first_process": first,
        "compile_restarted_process": restarted,
        "compile_bench_process": compiled_here,
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }


RATIOS = {
    "model_compiled_over_eager": ("model_compiled", "model_eager"),
    "task_compiled_over_eager": ("task_compiled", "task_eager"),
    "task_compiled_over_model_eager": ("task_compiled", "model_eager"),
    "task_eager_over_model_eager": ("task_eager", "model_eager"),
}
