"""Per-process worker context: the settings both sides agree on, one Redis job store, and the
verified specs of the jobs this process runs (with signing on, core/signing.py)."""
from __future__ import annotations

import json
import os
from typing import Any

import redis

from clipbatch.core.config import Settings
from clipbatch.core.jobs import JobStore
from clipbatch.core.signing import Refused, Verifier
from clipbatch.core.specs import FinetuneSpec, JobSpec, TrainShardsSpec, job_from_dict

SETTINGS = Settings.from_env()
VERIFIER = Verifier.from_env()  # None with signing off: specs and entries are taken as Redis holds them
_store: dict[int, JobStore] = {}


def job_store() -> JobStore:
    """One Redis connection pool per process (created after the fork)."""
    pid = os.getpid()
    if pid not in _store:
        client = redis.Redis.from_url(SETTINGS.broker_url, decode_responses=True)
        _store.clear()
        _store[pid] = JobStore(client, SETTINGS.job_ttl_s)
    return _store[pid]


_specs: dict[str, tuple[Any, str | None]] = {}  # job id -> (spec, the id of the key that signed it)
_SPECS_KEPT = 64


def _verified(jobs: JobStore, job_id: str) -> tuple[Any, str | None] | None:
    """A job's spec and its signer, read and verified once per process (a job's spec never changes);
    None when the record is gone; Refused (core/signing.py) when signing is on and no trusted key
    signed this spec for this job."""
    found = _specs.get(job_id)
    if found is None:
        raw = jobs.signed_spec(job_id)
        if raw is None:
            return None
        signer = None if VERIFIER is None else VERIFIER.spec(job_id, *raw)
        if len(_specs) >= _SPECS_KEPT:
            _specs.pop(next(iter(_specs)))
        found = _specs[job_id] = (job_from_dict(json.loads(raw[0])), signer)
    return found


def job_spec(jobs: JobStore, job_id: str) -> JobSpec | TrainShardsSpec | FinetuneSpec | None:
    """A job's spec (verified, with signing on); None when the record is gone (Redis lost it, or it
    expired): such a job's shards do not run."""
    found = _verified(jobs, job_id)
    return None if found is None else found[0]


def check_entry(jobs: JobStore, job_id: str, entry: tuple) -> None:
    """With signing on, Refused unless ``entry`` (index, input, version[, signature]) was signed by the
    key that signed its job's spec, or is derivable from that spec; nothing to check with signing off."""
    if VERIFIER is None:
        return
    found = _verified(jobs, job_id)
    if found is None:
        raise Refused(f"job {job_id} is gone: nothing verifies its entry {str(list(entry))[:300]}")
    spec, signer = found
    if signer is None:
        raise Refused(f"job {job_id}: its spec names no signer")
    VERIFIER.entry(signer, spec, job_id, entry)
