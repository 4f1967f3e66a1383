"""Per-process worker state: the device, one loaded model, the decode thread pool."""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from clipbatch.core.specs import ModelSpec
from clipbatch.workers import compiled
from clipbatch.workers.compute import CUDA_PRECISIONS
from clipbatch.workers.models import CACHE_DIR, ModelBundle, load_model, resolve_device

log = logging.getLogger("clipbatch.worker")

_state: dict[str, object] = {}

# Called with the bundle (its load_seconds and device) each time this process loads a model;
# the Celery side hooks its metrics here (clipbatch.tasks.hooks), so compute needs no Celery.
model_loaded: list[Callable[[ModelBundle], None]] = []


CGROUP_ROOT = "/sys/fs/cgroup"


def available_cpus(cgroup_root: str | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota.

    os.cpu_count() counts the host's cores: a container limited to 2 CPUs on a 64-core host
    would start 64 decode threads that the quota then throttles.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root or CGROUP_ROOT)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def _cgroup_quota(cgroup_root: str) -> int | None:
    """ceil(quota / period) from the process's own cgroup's cpu.max (or the root's); None when unlimited."""
    folders = [cgroup_root]
    try:
        with open("/proc/self/cgroup") as f:
            own = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if own and own != "/":
            folders.insert(0, cgroup_root + own)
    except OSError:
        pass
    for folder in folders:
        try:
            with open(os.path.join(folder, "cpu.max")) as f:
                quota, _, period = f.read().strip().partition(" ")
        except OSError:
            continue
        return None if quota == "max" else math.ceil(int(quota) / int(period or 100_000))
    return None


def decode_threads() -> int:
    """CLIPBATCH_DECODE_THREADS, or one decode thread per CPU this process may use."""
    return int(os.environ.get("CLIPBATCH_DECODE_THREADS") or available_cpus())


def configure_threads() -> None:
    """On CPU, torch's intra-op threads and the decode threads share the cores: no more than it may use."""
    torch_threads = os.environ.get("CLIPBATCH_TORCH_THREADS")
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    elif torch.get_num_threads() > available_cpus():
        torch.set_num_threads(available_cpus())
    _state["torch_threads"] = torch.get_num_threads()


@dataclass
class ForwardThreads:
    """How many intra-op threads the CPU forward gets, chosen batch by batch from measured costs.

    The decode threads and torch's intra-op threads share the cores. While decoding still has
    work, a forward split over every core stalls at each barrier waiting for a thread the decode
    threads have descheduled (measured: the tiny model's forward then took 60% of a shard instead
    of 15%). So the forward runs on one thread whenever one thread keeps up with decoding: its
    CPU cost per sample is at most the decode's wall time per sample. A model that cannot keep
    up (the model is the bound, as for ViT-B-32 on a CPU) gets every core, and so does any
    batch taken once nothing is left to decode. Both costs are measured, not inferred from
    waiting: a slow forward makes every batch look ready, which would argue for more threads.
    CLIPBATCH_TORCH_THREADS fixes the count instead.
    """

    full: int
    cpu_per_sample: float | None = None  # the forward's CPU seconds per sample, all threads together

    def choose(self, decode_s_per_sample: float | None, decode_idle: bool) -> int:
        if os.environ.get("CLIPBATCH_TORCH_THREADS"):
            threads = torch.get_num_threads()
        elif decode_idle:
            threads = self.full
        elif self.cpu_per_sample is None or decode_s_per_sample is None:
            threads = 1  # nothing measured yet, and decoding is busy: leave it the cores
        else:
            threads = 1 if self.cpu_per_sample <= decode_s_per_sample else self.full
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def observe(self, samples: int, thread_cpu_s: float, threads: int) -> None:
        """Record one forward: ``thread_cpu_s`` is the calling thread's CPU time over it."""
        if samples <= 0:
            return
        cost = thread_cpu_s * threads / samples  # intra-op threads share the work about evenly
        self.cpu_per_sample = cost if self.cpu_per_sample is None else 0.7 * self.cpu_per_sample + 0.3 * cost


def forward_threads() -> ForwardThreads:
    """This process's CPU forward thread chooser, for the loaded model (a new model starts afresh)."""
    if "forward_threads" not in _state:
        full = int(_state.setdefault("torch_threads", torch.get_num_threads()))  # type: ignore[arg-type]
        _state["forward_threads"] = ForwardThreads(full)
    return _state["forward_threads"]  # type: ignore[return-value]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas (unless MALLOC_ARENA_MAX is set), before the decode threads start.

    By default every thread that allocates may get an arena of its own (up to 8 per core), and a
    buffer one thread allocates and another frees stays in the first one's arena: the worker's
    RSS crept up 140 MB over 40 shards. With 2 arenas and a trim after each task it stays level:
    911-939 MB from the 3rd shard to the 60th, with no trend (bench/results, --rss-shards 60).
    """
    libc = _glibc()
    if libc is not None and not os.environ.get("MALLOC_ARENA_MAX"):
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def release_memory() -> None:
    """Hand the heap's free pages back to the OS after each task (a shard's buffers are gone by then)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def on_process_start() -> None:
    """A new worker process: torch's thread count, then the malloc arena cap."""
    configure_threads()
    limit_malloc_arenas()


def precision() -> str:
    """CLIPBATCH_PRECISION: bf16 (default), fp16 or fp32. CUDA autocasts to it; a CPU runs bf16 where it
    has bf16 instructions and fp32 otherwise (compute.autocast_dtype)."""
    value = os.environ.get("CLIPBATCH_PRECISION", "bf16")
    if value not in CUDA_PRECISIONS:
        raise ValueError(f"CLIPBATCH_PRECISION={value!r} is not one of {', '.join(CUDA_PRECISIONS)}")
    return value


def decode_on_device() -> bool:
    """CLIPBATCH_DECODE=device: JPEGs are decoded on the model's device (workers/device_decode.py)."""
    value = os.environ.get("CLIPBATCH_DECODE", "cpu")
    if value not in ("cpu", "device"):
        raise ValueError(f"CLIPBATCH_DECODE={value!r} is not cpu or device")
    return value == "device"


def device() -> torch.device:
    if "device" not in _state:
        _state["device"] = resolve_device(os.environ.get("CLIPBATCH_DEVICE", "auto"))
    return _state["device"]  # type: ignore[return-value]


def decode_pool() -> ThreadPoolExecutor:
    if "pool" not in _state:
        limit_malloc_arenas()
        _state["pool"] = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
    return _state["pool"]  # type: ignore[return-value]


def loaded_model() -> ModelBundle | None:
    """The model this process holds now, if any (loading none)."""
    bundle = _state.get("model")
    return bundle if isinstance(bundle, ModelBundle) else None


def model_for(spec: ModelSpec) -> ModelBundle:
    """The process keeps one model: loaded on first use, replaced only when a job needs another."""
    bundle = _state.get("model")
    if isinstance(bundle, ModelBundle) and bundle.spec == spec:
        return bundle
    _state.pop("model", None)
    _state.pop("forward_threads", None)
    if device().type == "cuda":
        torch.cuda.empty_cache()
    bundle = load_model(spec, device())
    log.info("model %s (%s) loaded on %s in %.1fs", spec.name, spec.pretrained, bundle.device, bundle.load_seconds)
    for listener in model_loaded:
        listener(bundle)
    _state["model"] = bundle
    return bundle


def towers_for(bundle: ModelBundle, batch_size: int) -> Any:
    """What the forward calls: the model, or its towers compiled for ``batch_size`` rows when this
    process compiles (CLIPBATCH_COMPILE, workers/compiled.py), built once per model and batch size."""
    if not compiled.compile_wanted(bundle.device):
        return bundle.model
    if batch_size not in bundle.compiled:
        cache = compiled.use_cache_dir(CACHE_DIR)
        threads = forward_threads().full if bundle.device.type == "cpu" else torch.get_num_threads()
        bundle.compiled[batch_size] = compiled.CompiledTowers(bundle.model, batch_size, bundle.limit, threads,
                                                              compiled.compile_mode())
        log.info("model %s compiles for batch %d (inductor cache %s)", bundle.spec.name, batch_size, cache)
    return bundle.compiled[batch_size]
