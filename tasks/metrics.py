"""Prometheus metrics of one worker, served by its main process on one port.

Celery's prefork pool runs shards in child processes, so the metrics use prometheus_client's
multiprocess mode: every process writes its values to files in a private folder and the main
process serves their sum. The mode is fixed when prometheus_client is first imported, which is
why ``start`` sets the folder before importing it. The metrics move on hooks (Celery's task
signals, ``clipbatch.tasks.lifecycle.shard_finished`` and the listeners of
``clipbatch.workers.runtime.model_loaded``), not in task bodies.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_process_shutdown

from clipbatch.tasks.lifecycle import shard_finished
from clipbatch.workers import runtime

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LISTEN_ADDR = "0.0.0.0"  # scraped from outside the pod or container
SHARD_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
MODEL_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PHASES = ("setup_s", "compute_s", "commit_s")
UNRECORDED_REASON = "unrecorded"  # failed samples the shard's stats file does not explain
OTHER_REASON = "other"  # a reason no pattern below knows
# clipbatch_sample_errors{reason} takes one of a fixed set of categories, never the reason itself
# (reasons carry member names, columns, line numbers: one series each would grow without bound).
# A reason gets the category of the first pattern matching its start; the full reason stays in
# the shard's errors file. The patterns follow the reasons workers/samples.py, workers/readers.py
# and core/manifests.py write; a new kind of reason needs its pattern here (else it counts as other).
_REASON_PATTERNS = (
    ("shard_unreadable", re.compile(r"shard unreadable\b")),
    ("shard_corrupt", re.compile(r"shard corrupt\b")),
    ("member_lost", re.compile(r"tar member lost\b")),
    ("duplicate_key", re.compile(r"duplicate key\b")),
    ("no_image", re.compile(r"no image\b")),
    ("no_caption", re.compile(r"no caption\b")),
    ("caption_invalid", re.compile(r"caption is not valid UTF-8")),
    ("json_invalid", re.compile(r"json member is not\b")),
    ("image_refused", re.compile(r"image \(\w{1,10}\) refused\b")),
    ("image_undecodable", re.compile(r"image \(\w{1,10}\) undecodable\b")),
    ("image_unreadable", re.compile(r"(image|file) unreadable\b")),
    ("manifest_row_invalid", re.compile(r"manifest line \d+ ")),
    ("image_column_invalid", re.compile(r"column .* holds\b")),
    ("member_too_large", re.compile(r"member too large\b")),
    ("sample_undecodable", re.compile(r"sample undecodable\b")),
    ("input_refused", re.compile(r"input refused\b")),
)
REASON_CATEGORIES = tuple(name for name, _ in _REASON_PATTERNS) + (UNRECORDED_REASON, OTHER_REASON)

log = logging.getLogger("clipbatch.metrics")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def reason_category(reason: str) -> str:
    """The fixed category (one of REASON_CATEGORIES) a recorded error reason is counted under."""
    if reason == UNRECORDED_REASON:
        return UNRECORDED_REASON
    return next((name for name, pattern in _REASON_PATTERNS if pattern.match(reason)), OTHER_REASON)


def error_reasons(result: Any) -> dict[str, int]:
    """Failed samples by reason category, from the shard's stats file (``stats/{i}.json``) when it has one."""
    counts: dict[str, int] = {}
    for name, data in result.files.items():
        if name.startswith("stats/") and name.endswith(".json"):
            for reason, n in json.loads(data).get("error_reasons", {}).items():
                category = reason_category(reason)
                counts[category] = counts.get(category, 0) + int(n)
    missing = result.samples_failed - sum(counts.values())
    if missing > 0:
        counts[UNRECORDED_REASON] = counts.get(UNRECORDED_REASON, 0) + missing
    return counts


class WorkerMetrics:
    """The worker's metrics and the hooks that move them (in whichever process runs the shard)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: in multiprocess mode the served registry reads the files, not these objects
        self.samples = Counter("clipbatch_samples_processed", "Samples embedded by shards this worker computed",
                               registry=None)
        self.errors = Counter("clipbatch_sample_errors", "Samples recorded as errors, by reason", ["reason"],
                              registry=None)
        self.shards = Counter("clipbatch_shards", "Shard tasks ended, by outcome", ["outcome"], registry=None)
        self.duration = Histogram("clipbatch_shard_duration_seconds", "Seconds per computed shard, by phase",
                                  ["phase"], buckets=SHARD_SECONDS_BUCKETS, registry=None)
        self.rate = Gauge("clipbatch_samples_per_second", "Samples/s of each process's last computed shard (summed)",
                          multiprocess_mode="livesum", registry=None)
        self.in_flight = Gauge("clipbatch_shards_in_flight", "Shard tasks running now", multiprocess_mode="livesum",
                               registry=None)
        self.model_load = Histogram("clipbatch_model_load_seconds", "Seconds to load a model onto the device",
                                    buckets=MODEL_LOAD_BUCKETS, registry=None)
        self._gpu: dict[str, Any] = {}

    def connect(self) -> None:
        """Hook the metrics to the worker; forked pool processes inherit the connections."""
        task_prerun.connect(self._task_started, weak=False)
        task_postrun.connect(self._task_ended, weak=False)
        shard_finished.connect(self._shard_finished, weak=False)
        runtime.model_loaded.append(self._model_loaded)
        worker_process_shutdown.connect(self._process_exits, weak=False)

    def _task_started(self, **_: Any) -> None:
        self.in_flight.inc()

    def _task_ended(self, retval: Any = None, state: str | None = None, **_: Any) -> None:
        self.in_flight.dec()
        outcome = retval.get("outcome") if isinstance(retval, dict) else None
        self.shards.labels(outcome=outcome or str(state or "unknown").lower()).inc()

    def _shard_finished(self, result: Any, timings: dict[str, float], **_: Any) -> None:
        if result is None:  # compute did not run (already committed): no work to count
            return
        self.samples.inc(result.samples_ok)
        for reason, n in error_reasons(result).items():
            self.errors.labels(reason=reason).inc(n)
        self.duration.labels(phase="total").observe(timings["seconds"])
        for phase in PHASES:
            self.duration.labels(phase=phase.removesuffix("_s")).observe(timings[phase])
        if timings["compute_s"] > 0:
            self.rate.set(result.samples_ok / timings["compute_s"])
        self._gpu_memory()

    def _model_loaded(self, bundle: Any) -> None:
        self.model_load.observe(bundle.load_seconds)
        self._gpu_memory()

    def _gpu_memory(self) -> None:
        """GPU memory of this process, exported only by processes whose device is CUDA."""
        device = runtime.device()
        if device.type != "cuda":
            return
        import torch
        from prometheus_client import Gauge

        if not self._gpu:
            for name, what in (("allocated", "held by tensors"), ("reserved", "reserved by the caching allocator"),
                               ("max_allocated", "peak held by tensors")):
                self._gpu[name] = Gauge(f"clipbatch_gpu_memory_{name}_bytes", f"CUDA memory {what}",
                                        multiprocess_mode="livesum", registry=None)
        self._gpu["allocated"].set(torch.cuda.memory_allocated(device))
        self._gpu["reserved"].set(torch.cuda.memory_reserved(device))
        self._gpu["max_allocated"].set(torch.cuda.max_memory_allocated(device))

    def _process_exits(self, **_: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


def _registry(folder: str) -> Any:
    """Sums the processes' files; live gauges of pool processes that died without cleanup are dropped."""
    from prometheus_client import CollectorRegistry, multiprocess

    # Defined here: prometheus_client may only be imported once the folder is set (see the module doc).
    class Collector(multiprocess.MultiProcessCollector):
        def collect(self):  # noqa: ANN202 (prometheus_client's signature)
            for path in Path(folder).glob("gauge_live*_*.db"):
                pid = int(path.stem.rsplit("_", 1)[1])
                if not _alive(pid):
                    multiprocess.mark_process_dead(pid, folder)
            return super().collect()

    registry = CollectorRegistry()
    Collector(registry, path=folder)
    return registry


def start(port: int) -> WorkerMetrics:
    """Serve this worker's metrics on ``port`` and hook them up; call in the main process before the pool forks."""
    folder = tempfile.mkdtemp(prefix="clipbatch-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    from prometheus_client import start_http_server

    start_http_server(port, addr=LISTEN_ADDR, registry=_registry(folder))
    metrics = WorkerMetrics()
    metrics.connect()
    log.info("metrics on :%d/metrics (multiprocess folder %s)", port, folder)
    return metrics
