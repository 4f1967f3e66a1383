"""Per-process worker context: the settings both sides agree on and one Redis job store."""
from __future__ import annotations

import os

import redis

from clipbatch.core.config import Settings
from clipbatch.core.jobs import JobStore

SETTINGS = Settings.from_env()
_store: dict[int, JobStore] = {}


def job_store() -> JobStore:
    """One Redis connection pool per process (created after the fork)."""
    pid = os.getpid()
    if pid not in _store:
        client = redis.Redis.from_url(SETTINGS.broker_url, decode_responses=True)
        _store.clear()
        _store[pid] = JobStore(client, SETTINGS.job_ttl_s)
    return _store[pid]
