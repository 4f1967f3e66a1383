"""Every Redis key name clipbatch uses, and the job states."""
from __future__ import annotations

import hashlib
from enum import Enum

PREFIX = "clipbatch"
JOBS_INDEX = f"{PREFIX}:jobs"  # sorted set: job_id -> created_at
DEAD_LETTERS = f"{PREFIX}:dead_letters"  # list of JSON records, newest first
SUBMITTING = f"{PREFIX}:submitting"  # sorted set: job_id -> created_at, of submits not yet whole
# The dead-letter list keeps this many records, the newest; older ones are trimmed on each push.
DEAD_LETTERS_MAX = 10_000


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def job(job_id: str) -> str:
    """Hash: spec, state and counters of one job."""
    return f"{PREFIX}:job:{job_id}"


def job_done(job_id: str) -> str:
    """Set of shard indices already counted as done (makes counting idempotent)."""
    return f"{PREFIX}:job:{job_id}:done"


def job_failed(job_id: str) -> str:
    """Hash: shard index -> failure reason."""
    return f"{PREFIX}:job:{job_id}:failed"


def job_deliveries(job_id: str) -> str:
    """Hash: shard index -> how many times a worker started it (caps poison shards)."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def job_finalizing(job_id: str) -> str:
    """String with a lease: the process finalising the job (one at a time)."""
    return f"{PREFIX}:job:{job_id}:finalizing"


def job_producer(job_id: str) -> str:
    """String with a TTL: the producer is still enqueueing the job's messages (refreshed as it goes)."""
    return f"{PREFIX}:job:{job_id}:producer"


def job_commits(job_id: str) -> str:
    """Hash: shard index -> what the job's end needs of its commit (attempt, files, score bounds, counts)."""
    return f"{PREFIX}:job:{job_id}:commits"


def job_merged(job_id: str) -> str:
    """Hash: the shards counted so far, merged (score histogram fields, sample and error-reason counts)."""
    return f"{PREFIX}:job:{job_id}:merged"


def job_pending(job_id: str) -> str:
    """List: the job's task entries not yet published, in plan order (core/feed.py)."""
    return f"{PREFIX}:job:{job_id}:pending"


def job_fed(job_id: str) -> str:
    """Hash: parent -> the pending entry it published as its successor (core/feed.py)."""
    return f"{PREFIX}:job:{job_id}:fed"


def job_stage(job_id: str, stage: str) -> str:
    """Set: the global indices of the stage's tasks committed or given up on (core/stages.py)."""
    return f"{PREFIX}:job:{job_id}:stage:{stage}"


def job_stage_given_up(job_id: str, stage: str) -> str:
    """Set: the stage's tasks given up on (dead-lettered); any one ends the job at the stage's end."""
    return f"{PREFIX}:job:{job_id}:stage:{stage}:given_up"


def job_stage_claim(job_id: str, stage: str) -> str:
    """String: who moves the job past the stage ('claimed:<index>', then 'launched'), or 'ended'."""
    return f"{PREFIX}:job:{job_id}:stage:{stage}:next"


def output_lease(canonical_output: str) -> str:
    """String: the job holding an output (core/leases.py); a digest of its canonical URI (URIs can be
    long and hold any byte)."""
    return f"{PREFIX}:output:{hashlib.sha256(canonical_output.encode()).hexdigest()[:32]}"


def prefetch_held(node: str, pid: int) -> str:
    """Set: the delivery tags of the read-ahead messages pool process ``pid`` of worker ``node`` holds."""
    return f"{PREFIX}:readahead:{node}:{pid}"


def job_keys(job_id: str) -> list[str]:
    return [job(job_id), job_done(job_id), job_failed(job_id), job_deliveries(job_id), job_commits(job_id),
            job_merged(job_id)]
