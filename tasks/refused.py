"""The worker's consumer when messages are signed (core/signing.py): every message it refuses is
recorded in the dead-letter list before Celery drops it; no job's state changes for it."""
from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery.worker.consumer import Consumer

from clipbatch.core import keys
from clipbatch.core.config import redact

_REASON_MAX = 2000


class DeadLetteringConsumer(Consumer):
    """Celery's consumer, recording every message it refuses (unsigned, signed by an unknown key,
    undecodable) in the dead-letter list before Celery drops it."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, exc)
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, exc)
        super().on_invalid_task(body, message, exc)

    def _dead_letter(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
        reason = (f"message refused, not run (task {str(headers.get('task'))[:200]!r}, "
                  f"id {str(headers.get('id'))[:64]!r}): {type(exc).__name__}: {exc}")
        record = {"job_id": "-", "index": -1, "input": "", "reason": redact(reason)[:_REASON_MAX], "at": time.time()}
        client = redis.Redis.from_url(self.app.conf.broker_url)
        pipe = client.pipeline()
        pipe.lpush(keys.DEAD_LETTERS, json.dumps(record))
        pipe.ltrim(keys.DEAD_LETTERS, 0, keys.DEAD_LETTERS_MAX - 1)
        pipe.execute()
