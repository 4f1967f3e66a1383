"""Per-process worker context: the settings both sides agree on and one Redis job store."""
from __future__ import annotations

import os
from typing import Any

import redis

from clipbatch.core.config import Settings
from clipbatch.core.jobs import JobStore
from clipbatch.core.specs import FinetuneSpec, JobSpec, TrainShardsSpec, job_from_dict

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


_specs: dict[str, Any] = {}
_SPECS_KEPT = 64


def job_spec(jobs: JobStore, job_id: str) -> JobSpec | TrainShardsSpec | FinetuneSpec | None:
    """A job's spec, read once per process from its Redis record (a job's spec never changes);
    None when the record is gone (Redis lost it, or it expired): such a job's shards do not run."""
    spec = _specs.get(job_id)
    if spec is None:
        raw = jobs.spec(job_id)
        if raw is None:
            return None
        if len(_specs) >= _SPECS_KEPT:
            _specs.pop(next(iter(_specs)))
        spec = _specs[job_id] = job_from_dict(raw)
    return spec
