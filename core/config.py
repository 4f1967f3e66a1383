"""Settings read from the environment, shared by the producer and the workers."""
from __future__ import annotations

import logging
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
# A job keeps at most this many of its shard messages in the broker; the rest wait in its pending
# list (core/feed.py). Keep it above the number of workers (KEDA: maxReplicaCount x listLength).
DEFAULT_QUEUE_WINDOW = 1_000
# A submit whose producer has not refreshed its heartbeat for this long, while enqueueing, is presumed
# dead: the workers' sweep (or the next submit on its output) ends its job failed (core/submits.py).
DEFAULT_SUBMIT_STALE_S = 600


class ConfigError(ValueError):
    """An environment variable a user set holds a value clipbatch cannot use (named in the message)."""


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be an integer") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: must be positive")
    return value


# A URL's userinfo reads as URL parsers read it (urllib, redis-py): the user runs to the first ':'
# (an '@' may be in it), the password from there to the last '@' before the host, so a password
# holding '@', ':', '/', '%', quotes or backslashes is masked whole. Both stop only at whitespace (a
# raw space cannot be in a URL): a password is never cut short at a character it may hold, and two
# URLs glued without a space are masked from the first password to the last '@' (more, never less).
# A query parameter whose name says it is a credential is masked to the next '&', '#' or space.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#\s]*:)\S*@")
_CREDENTIAL_PARAM = re.compile(
    r"""(?i)(?P<head>[?&;](?:[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|signature|"""
    r"""credential)[\w.-]*|auth|sig|pass|key)=)[^&#\s]*""")


def redact(text: str) -> str:
    """Every URL in ``text`` with its password and credential query parameters as ``***``: safe to
    print, log or record. ``redis://u:p@ss@h/0?password=x`` -> ``redis://u:***@h/0?password=***``."""
    return _CREDENTIAL_PARAM.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>***@", text))


class RedactingFilter(logging.Filter):
    """A log filter that redacts each record's formatted message (installed on the worker's handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


@dataclass(frozen=True)
class Settings:
    """Everything both sides of the queue must agree on."""

    broker_url: str
    visibility_timeout_s: int
    max_retries: int
    job_ttl_s: int
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    queue_window: int = DEFAULT_QUEUE_WINDOW
    submit_stale_s: int = DEFAULT_SUBMIT_STALE_S

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            broker_url=os.environ.get("CLIPBATCH_BROKER_URL") or DEFAULT_BROKER_URL,
            visibility_timeout_s=_int_env("CLIPBATCH_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT_S),
            max_retries=_int_env("CLIPBATCH_MAX_RETRIES", DEFAULT_MAX_RETRIES),
            job_ttl_s=_int_env("CLIPBATCH_JOB_TTL", DEFAULT_JOB_TTL_S),
            max_deliveries=_int_env("CLIPBATCH_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES),
            queue_window=_int_env("CLIPBATCH_QUEUE_WINDOW", DEFAULT_QUEUE_WINDOW),
            submit_stale_s=_int_env("CLIPBATCH_SUBMIT_STALE_S", DEFAULT_SUBMIT_STALE_S),
        )
