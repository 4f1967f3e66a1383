"""Worker hooks: per-process setup and memory release, on Celery's signals (not in task bodies)."""
from __future__ import annotations

from celery.signals import task_postrun, worker_process_init, worker_shutting_down

from clipbatch.tasks import prefetch
from clipbatch.workers import readahead, runtime

readahead.input_drained.append(prefetch.on_input_drained)


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
