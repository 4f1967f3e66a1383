"""A curation job's stage counts in Redis: which tasks of each stage are committed, and the
write stage's tars added to the job's total once.

The job's own record (core/jobs.py) counts every stage task at its global index; these sets
only answer "is this stage complete?" for the task that just committed, before it is counted
(so the job never looks complete between two stages). Keys expire with the job's hash.
"""
from __future__ import annotations

from typing import Iterable

import redis

from clipbatch.core import keys

_EXPIRE_WITH_JOB = """
local function expire_with_job(i)
  if redis.call('PTTL', KEYS[i]) ~= -1 then return end
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then redis.call('PEXPIRE', KEYS[i], left) else redis.call('EXPIRE', KEYS[i], ARGV[#ARGV]) end
end
"""

# KEYS: job hash, stage set. ARGV: index, ttl. Returns the stage's committed count, -1 without a job.
_COMMITTED = _EXPIRE_WITH_JOB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SADD', KEYS[2], ARGV[1])
expire_with_job(2)
return redis.call('SCARD', KEYS[2])
"""

# KEYS: job hash, guard. ARGV: tars, ttl. Adds the write stage's tasks to the job's total once.
_ADD_WRITE = _EXPIRE_WITH_JOB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX') then
  expire_with_job(2)
  redis.call('HINCRBY', KEYS[1], 'shards_total', ARGV[1])
  return 1
end
return 0
"""


def stage_key(job_id: str, stage: str) -> str:
    """Set: the global indices of the stage's committed tasks."""
    return f"{keys.PREFIX}:job:{job_id}:stage:{stage}"


def write_key(job_id: str) -> str:
    """String: the write stage's tar count, once it is part of the job's total."""
    return f"{keys.PREFIX}:job:{job_id}:stage:write:total"


class StageCounts:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._committed = client.register_script(_COMMITTED)
        self._add_write = client.register_script(_ADD_WRITE)

    def committed(self, job_id: str, stage: str, index: int) -> int:
        """Record a committed task (idempotent); the stage's count so far, -1 when the job is gone."""
        return int(self._committed(keys=[keys.job(job_id), stage_key(job_id, stage)], args=[index, self.ttl_s]))

    def seed(self, job_id: str, stage: str, indices: Iterable[int], write_total: int | None = None) -> None:
        """A (re)submit: the stage's tasks already committed in storage, and the tars already in the total."""
        indices = list(indices)
        pipe = self.r.pipeline()
        if indices:
            pipe.sadd(stage_key(job_id, stage), *indices)
            pipe.expire(stage_key(job_id, stage), self.ttl_s)
        if write_total is not None:
            pipe.set(write_key(job_id), write_total, ex=self.ttl_s)
        pipe.execute()

    def add_write(self, job_id: str, tars: int) -> bool:
        """Add the write stage's tars to the job's total, once however often it is asked."""
        return int(self._add_write(keys=[keys.job(job_id), write_key(job_id)], args=[tars, self.ttl_s])) == 1
