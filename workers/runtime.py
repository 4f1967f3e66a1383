"""Per-process worker state: the device, one loaded model, the decode thread pool."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from celery.signals import worker_process_init
from celery.utils.dispatch import Signal

from tasks.specs import ModelSpec
from workers.compute import CUDA_PRECISIONS
from workers.models import ModelBundle, load_model, resolve_device

log = logging.getLogger("clipbatch.worker")

_state: dict[str, object] = {}

# Sent with ``bundle`` (its load_seconds and device) each time this process loads a model; metrics listen.
model_loaded = Signal(name="model_loaded")


def decode_threads() -> int:
    return int(os.environ.get("CLIPBATCH_DECODE_THREADS") or max(1, os.cpu_count() or 1))


def configure_threads() -> None:
    """On CPU, torch's intra-op threads and the decode threads share the cores."""
    torch_threads = os.environ.get("CLIPBATCH_TORCH_THREADS")
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    _state["torch_threads"] = torch.get_num_threads()


def forward_threads(decode_is_behind: bool) -> None:
    """Give the CPU forward all cores only when decoding is ahead of it (the caller judges that
    from how many of a shard's batches were still decoding when the forward wanted them).

    When the decode threads are busy on every core (the input is the bound), a forward split
    over several intra-op threads stalls at each barrier waiting for a descheduled thread:
    measured here, the tiny model's forward then took 75% of a shard instead of 10%. One
    thread leaves the cores to decoding. When decoding is ahead (the model is the bound), the
    forward takes every core. CLIPBATCH_TORCH_THREADS fixes the count instead.
    """
    if os.environ.get("CLIPBATCH_TORCH_THREADS"):
        return
    full = int(_state.setdefault("torch_threads", torch.get_num_threads()))  # type: ignore[arg-type]
    wanted = 1 if decode_is_behind else full
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@worker_process_init.connect
def _on_process_start(**_: object) -> None:
    configure_threads()


def precision() -> str:
    """Autocast on CUDA: bf16 (default), fp16 or fp32 (CLIPBATCH_PRECISION); the CPU runs fp32."""
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
        _state["pool"] = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
    return _state["pool"]  # type: ignore[return-value]


def model_for(spec: ModelSpec) -> ModelBundle:
    """The process keeps one model: loaded on first use, replaced only when a job needs another."""
    bundle = _state.get("model")
    if isinstance(bundle, ModelBundle) and bundle.spec == spec:
        return bundle
    _state.pop("model", None)
    if device().type == "cuda":
        torch.cuda.empty_cache()
    bundle = load_model(spec, device())
    log.info("model %s (%s) loaded on %s in %.1fs", spec.name, spec.pretrained, bundle.device, bundle.load_seconds)
    model_loaded.send(sender=None, bundle=bundle)
    _state["model"] = bundle
    return bundle
