"""Worker hooks: per-process setup and memory release, on Celery's signals (not in task bodies)."""
from __future__ import annotations

import logging
from typing import Any

from celery.signals import task_postrun, worker_process_init, worker_ready, worker_shutting_down

from clipbatch.core import submits
from clipbatch.tasks import prefetch
from clipbatch.tasks.context import SETTINGS, job_store
from clipbatch.workers import prefetch as warm, runtime

log = logging.getLogger("clipbatch.worker")

warm.input_drained.append(prefetch.on_input_drained)


@worker_process_init.connect
def _on_process_start(**_: object) -> None:
    runtime.on_process_start()


@task_postrun.connect
def _release_memory(**_: object) -> None:
    """Hand the heap's free pages back to the OS after each task (a shard's buffers are gone by then)."""
    runtime.release_memory()


@worker_shutting_down.connect
def _stop_read_ahead(**_: object) -> None:
    """In the main process: the pool's processes take no more read-ahead messages."""
    prefetch.worker_stopping()


@worker_ready.connect
def _start_sweeping_dead_submits(sender: Any = None, **_: object) -> None:
    """In the main process, on the consumer's timer: end the jobs whose submit died (core/submits.py)
    every quarter of CLIPBATCH_SUBMIT_STALE_S (1 to 60 s)."""
    sender.timer.call_repeatedly(submits.sweep_interval_s(SETTINGS.submit_stale_s), _sweep_dead_submits)


def _sweep_dead_submits() -> None:
    try:
        submits.sweep(job_store(), SETTINGS.submit_stale_s)
    except Exception:  # noqa: BLE001 (Redis away: the next sweep tries again)
        log.warning("sweep of dead submits failed", exc_info=True)
