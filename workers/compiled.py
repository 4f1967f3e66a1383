"""The model's two towers through ``torch.compile``, at one fixed batch shape.

A batch smaller than the shape (a shard's last, a batch of new captions) is padded with copies of
its last row and the rows it asked for are sliced off the result, so each tower compiles once per
model and batch size. Inductor's on-disk caches (its FX graph cache among them) live under the
worker's cache dir, so a restarted worker loads the compiled code instead of compiling again.

``CLIPBATCH_COMPILE`` = ``1`` | ``0`` | ``auto`` (default): auto compiles on CUDA only. On 2 quiet CPU cores
(bench/results/2026-11-29-cpu.json ``ViT-B-32-compile``: ViT-B-32, batch 64, bf16, interleaved rounds) the
compiled forward ran 1.035x the eager one alone and the task path 1.015x, for 32 s of compiling per new
process; on oversubscribed cores it ran slower (0.53x; most likely each fused kernel's OpenMP region waits for a
descheduled thread). A decode-bound model (the tiny one) has nothing to gain: no CPU model compiles unless asked.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from clipbatch.workers.compute import BatchLimit, is_out_of_memory

log = logging.getLogger("clipbatch.compile")

COMPILE_CHOICES = ("auto", "1", "0")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INDUCTOR_CACHE = "inductor"  # under the worker's cache dir


def compile_wanted(device: torch.device) -> bool:
    """Whether this process compiles the model's towers on ``device`` (CLIPBATCH_COMPILE; auto: on CUDA)."""
    value = os.environ.get("CLIPBATCH_COMPILE", "auto")
    if value not in COMPILE_CHOICES:
        raise ValueError(f"CLIPBATCH_COMPILE={value!r} is not one of {', '.join(COMPILE_CHOICES)}")
    if value != "auto":
        return value == "1"
    return device.type == "cuda"


def compile_mode() -> str:
    """torch.compile's mode (CLIPBATCH_COMPILE_MODE, default ``default``; ``reduce-overhead`` adds CUDA graphs)."""
    value = os.environ.get("CLIPBATCH_COMPILE_MODE", "default")
    if value not in COMPILE_MODES:
        raise ValueError(f"CLIPBATCH_COMPILE_MODE={value!r} is not one of {', '.join(COMPILE_MODES)}")
    return value


def use_cache_dir(cache_dir: Path) -> Path:
    """Point inductor's on-disk caches under ``cache_dir``, unless TORCHINDUCTOR_CACHE_DIR names another
    folder than inductor's default (torch writes its default into the variable once it has looked)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / INDUCTOR_CACHE)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _cache_counts() -> Counter:
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return Counter(hits=inductor["fxgraph_cache_hit"], misses=inductor["fxgraph_cache_miss"])


class CompiledTowers:
    """``encode_image`` and ``encode_text`` compiled for ``batch`` rows: what compute.encode_images and
    encode_texts call in place of the model (they also ask it for ``parameters()``).

    A tower's first call compiles it, on every core torch may use (inductor's CPU kernels keep the
    thread count they were built with), and is timed: ``compile_seconds`` and the FX graph cache's
    ``cache`` hits and misses say what it cost. After an out-of-memory the forward batch limit is
    the shape (one more compile). A tower whose compilation fails runs eagerly from then on, logged.
    """

    def __init__(self, model: torch.nn.Module, batch: int, limit: BatchLimit, threads: int, mode: str = "default"
                 ) -> None:
        self.model, self.batch, self.limit, self.threads = model, batch, limit, threads
        self.mode = mode
        self.towers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            name: torch.compile(getattr(model, f"encode_{name}"), dynamic=False, mode=None if mode == "default" else mode)
            for name in ("image", "text")}
        self.compile_seconds: dict[str, float] = {}
        self.cache: Counter = Counter()
        self.failed: dict[str, str] = {}

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("image", images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", tokens)

    def shape(self) -> int:
        """The rows every compiled call takes: the batch, or the smaller limit an out-of-memory left."""
        return min(self.batch, self.limit.size) if self.limit.size else self.batch

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rows = self.shape()
        if name in self.failed:
            return getattr(self.model, f"encode_{name}")(x)
        if x.shape[0] > rows:
            return torch.cat([self._run(name, part) for part in x.split(rows)])
        n = x.shape[0]
        if torch.is_inference_mode_enabled() and not x.is_inference():
            x = x.clone()  # dynamo guards on it: an inference tensor always (a padded batch is one), one compile
        if n < rows:
            x = torch.cat([x, x[-1:].expand(rows - n, *x.shape[1:])])
            if x.dim() == 4 and x.is_cuda:  # the layout compute.encode_images gave: one set of guards
                x = x.contiguous(memory_format=torch.channels_last)
        if name not in self.compile_seconds:
            return self._first(name, x)[:n]
        return self.towers[name](x)[:n]

    def _first(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The tower's first call: compile (or load from the cache) on every core, timed."""
        threads, before, start = torch.get_num_threads(), _cache_counts(), time.perf_counter()
        torch.set_num_threads(self.threads)
        try:
            out = self.towers[name](x)
        except Exception as exc:  # noqa: BLE001 (any compiler failure: the eager tower still works)
            if is_out_of_memory(exc):
                raise
            self.failed[name] = f"{type(exc).__name__}: {exc}"
            log.warning("compiling the %s tower failed, it runs eagerly: %s", name, self.failed[name][:500])
            return getattr(self.model, f"encode_{name}")(x)
        finally:
            torch.set_num_threads(threads)
        self.compile_seconds[name] = time.perf_counter() - start
        self.cache.update(_cache_counts() - before)
        log.info("compiled the %s tower for %d rows in %.1fs (FX graph cache hits=%d misses=%d)", name,
                 x.shape[0], self.compile_seconds[name], self.cache["hits"], self.cache["misses"])
        return out


def describe(towers: Any) -> dict[str, Any]:
    """What a shard's stats say of its forward: compiled or not, and what compiling cost so far."""
    if not isinstance(towers, CompiledTowers):
        return {"compiled": False}
    return {"compiled": True, "compile_mode": towers.mode, "compiled_rows": towers.shape(),
            "compile_s": {k: round(v, 3) for k, v in towers.compile_seconds.items()},
            "compile_cache": {"hits": towers.cache["hits"], "misses": towers.cache["misses"]},
            "compile_failed": dict(towers.failed)}
