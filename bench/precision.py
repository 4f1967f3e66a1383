"""fp32 vs bf16 forward on the CPU (workers/compute.py), on the same shards and weights, in interleaved rounds.

Run through ``python -m bench.throughput --precision``. Each round measures, in turn: the model alone on
pre-made tensors in fp32 and in bf16, and the worker's task path (embed_shard + commit) with
CLIPBATCH_PRECISION=fp32 and =bf16. On a CPU without bf16 instructions bf16 runs fp32 (the
result's ``effective`` says so) and the ratios are ~1.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Callable

from clipbatch.core.specs import JobSpec
from clipbatch.workers import runtime
from clipbatch.workers.compute import effective_precision

RATIOS = {
    "model_bf16_over_fp32": ("model_bf16", "model_fp32"),
    "task_bf16_over_fp32": ("task_bf16", "task_fp32"),
    # the bound: the eager fp32 model alone
    "task_bf16_over_model_fp32": ("task_bf16", "model_fp32"),
    "task_bf16_over_model_bf16": ("task_bf16", "model_bf16"),
    "task_fp32_over_model_fp32": ("task_fp32", "model_fp32"),
}


def compare_precision(spec: JobSpec, paths: list[Path], work: Path, batch_size: int, rounds: int, good: int,
                      model_bound: Callable[..., float], task_path: Callable[..., tuple[float, dict[str, float]]],
                      log: Callable[[str], None]) -> dict[str, Any]:
    """Medians of fp32 and bf16, model-only and task path, and their ratios per round."""
    bundle = runtime.model_for(spec.model)
    captions = [f"a photo of sample {i}" for i in range(64)]
    before = os.environ.get("CLIPBATCH_PRECISION")
    os.environ["CLIPBATCH_COMPILE"] = "0"
    for flag in ("fp32", "bf16"):  # warm the task path both ways before timing
        os.environ["CLIPBATCH_PRECISION"] = flag
        task_path(spec, paths[:1], work / f"warm-{flag}")
    runs: dict[str, list[float]] = {k: [] for k in ("model_fp32", "model_bf16", "task_fp32", "task_bf16")}
    shares: dict[str, list[dict[str, float]]] = {"task_fp32": [], "task_bf16": []}
    try:
        for r in range(rounds):
            for flag in ("fp32", "bf16"):
                os.environ["CLIPBATCH_PRECISION"] = flag
                runs[f"model_{flag}"].append(model_bound(bundle, batch_size, good, captions))
            for flag in ("fp32", "bf16"):
                os.environ["CLIPBATCH_PRECISION"] = flag
                rate, share = task_path(spec, paths, work / f"out-{flag}-{r}")
                runs[f"task_{flag}"].append(rate)
                shares[f"task_{flag}"].append(share)
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in runs.items()))
    finally:
        os.environ.pop("CLIPBATCH_COMPILE")
        if before is None:
            os.environ.pop("CLIPBATCH_PRECISION")
        else:
            os.environ["CLIPBATCH_PRECISION"] = before
    per_round = {name: [a / b for a, b in zip(runs[x], runs[y])] for name, (x, y) in RATIOS.items()}
    return {
        "effective": {flag: effective_precision(bundle.device, flag) for flag in ("fp32", "bf16")},
        "samples_per_s_median": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "samples_per_s_all": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "ratios_median_of_rounds": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "ratios_all": {k: [round(x, 3) for x in v] for k, v in per_round.items()},
        "task_time_shares": {name: {k: round(statistics.median(s[k] for s in rows), 4) for k in rows[0]}
                             for name, rows in shares.items()},
    }
