"""Settings read from the environment, shared by the producer and the workers."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "gpu"
# Longer than the slowest shard: a message not acked within it is redelivered.
DEFAULT_VISIBILITY_TIMEOUT_S = 3600
# Deliveries of one shard message before the shard is recorded as failed.
DEFAULT_MAX_RETRIES = 2
# Starts of one shard (redeliveries after lost workers included) before it is dead-lettered.
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_JOB_TTL_S = 30 * 24 * 3600


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be an integer") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: must be positive")
    return value


def redact(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: safe to print or log."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@dataclass(frozen=True)
class Settings:
    """Everything both sides of the queue must agree on."""

    broker_url: str
    visibility_timeout_s: int
    max_retries: int
    job_ttl_s: int
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            broker_url=os.environ.get("CLIPBATCH_BROKER_URL") or DEFAULT_BROKER_URL,
            visibility_timeout_s=_int_env("CLIPBATCH_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT_S),
            max_retries=_int_env("CLIPBATCH_MAX_RETRIES", DEFAULT_MAX_RETRIES),
            job_ttl_s=_int_env("CLIPBATCH_JOB_TTL", DEFAULT_JOB_TTL_S),
            max_deliveries=_int_env("CLIPBATCH_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES),
        )
