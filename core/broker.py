"""The message contract both sides share: task names and one Celery configuration.

The producer builds this app to publish by task name (``send_task``); the workers build it with
their task modules included (``clipbatch.tasks.app``). JSON only, late acks, one message in
flight per process. Nothing here imports a task, so publishing needs neither torch nor the tasks.
"""
from __future__ import annotations

from celery import Celery

from clipbatch.core.config import DEFAULT_QUEUE, Settings

EMBED_SHARD = "clipbatch.embed_shard"
TRAIN_SHARD = "clipbatch.write_train_shard"
FINETUNE_STEP = "clipbatch.finetune_step"
FINALIZE_JOB = "clipbatch.finalize_job"


def make_app(settings: Settings | None = None, include: tuple[str, ...] = ()) -> Celery:
    """Build the Celery app; the producer and every worker must use the same settings."""
    settings = settings or Settings.from_env()
    app = Celery("clipbatch", broker=settings.broker_url, include=list(include))
    vt = settings.visibility_timeout_s
    transport = {
        "visibility_timeout": vt,
        # Sweep for messages of dead workers often enough that a short timeout means a short wait.
        "unacked_restore_interval": max(1, min(10, vt // 10)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Progress lives in our own Redis hash; no Celery result backend.
        task_ignore_result=True,
        # At-least-once: ack after the task, requeue when the process dies, hold one message.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # The visibility timeout is read from both option sets; keep them equal.
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=DEFAULT_QUEUE,
        task_create_missing_queues=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app

