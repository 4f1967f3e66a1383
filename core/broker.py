"""The message contract both sides share: task names and one Celery configuration.

The producer builds this app to publish by task name (``send_task``); the workers build it with
their task modules included (``clipbatch.tasks.app``). JSON only, late acks, one message in
flight per process. Nothing here imports a task, so publishing needs neither torch nor the tasks.
"""
from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app.amqp import AMQP
from celery.signals import after_setup_logger
from celery.utils.saferepr import saferepr

from clipbatch.core.config import DEFAULT_QUEUE, RedactingFilter, Settings, redact
from clipbatch.core.signing import Signing, enable as enable_signing

EMBED_SHARD = "clipbatch.embed_shard"
TRAIN_SHARD = "clipbatch.write_train_shard"
FINETUNE_STEP = "clipbatch.finetune_step"
FINALIZE_JOB = "clipbatch.finalize_job"
CURATE_STAGE = "clipbatch.curate_stage"  # a clusters, assign or dedup task of a training-shards job


class RedactingAMQP(AMQP):
    """Messages whose ``argsrepr``/``kwargsrepr`` (what Flower, events and logs show of a task's
    arguments) have URL passwords and credential query parameters masked; the body is unchanged."""

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None, *rest: Any,
                   argsrepr: str | None = None, kwargsrepr: str | None = None, **options: Any) -> Any:
        levels = self.app.conf.task_repr_maxlevels
        argsrepr = redact(argsrepr if argsrepr is not None else saferepr(args, self.argsrepr_maxsize, maxlevels=levels))
        kwargsrepr = redact(kwargsrepr if kwargsrepr is not None
                            else saferepr(kwargs, self.kwargsrepr_maxsize, maxlevels=levels))
        return super().as_task_v2(task_id, name, args, kwargs, *rest, argsrepr=argsrepr, kwargsrepr=kwargsrepr,
                                  **options)


@after_setup_logger.connect(weak=False, dispatch_uid="clipbatch.redact_logs")
def _redact_logs(logger: Any = None, **_: Any) -> None:
    """Every handler of a worker's root logger redacts what it writes (a URL password never reaches a log)."""
    for handler in getattr(logger, "handlers", ()):
        handler.addFilter(RedactingFilter())


def make_app(settings: Settings | None = None, include: tuple[str, ...] = ()) -> Celery:
    """Build the Celery app; the producer and every worker must use the same settings."""
    settings = settings or Settings.from_env()
    app = Celery("clipbatch", broker=settings.broker_url, include=list(include), amqp=RedactingAMQP)
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
    signing = Signing.from_env()
    if signing is not None:  # opt-in: core/signing.py
        enable_signing(app, signing)
    return app

