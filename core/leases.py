"""One job per output at a time: a Redis lease on the output, held from submit to the job's end.

Two plans of one output made while the other's shards are still queued could give one index to
two different inputs (a new input takes its sorted position), losing one and duplicating
another. So a submit first takes the output's lease; a second submit on the same output while
the holder plans, is queued or runs is refused, naming the holder. The lease goes when the job
ends (finalised or cancelled), and a holder that already ended never blocks: the next submit
takes the lease over in the same atomic script. If Redis loses its state the leases go with the
queue, and a resubmit plans from storage. The nightly scheduler's next run therefore waits for
the last one to end (it logs the refusal and submits again at its next time).
"""
from __future__ import annotations


import redis

from clipbatch.core import keys
from clipbatch.core.storage import canonical

# While a submit plans, before its job record exists, the lease lives this long.
PLANNING_TTL_S = 900

# KEYS: lease. ARGV: job id, ttl seconds, job-hash key prefix. Returns '' when taken, else the holder.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local state = redis.call('HGET', ARGV[3] .. holder, 'state')
  -- no record yet: the holder is still planning (its lease lapses on its own if it died there)
  if state == false or state == 'queued' or state == 'running' then return holder end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ''
"""

# KEYS: lease. ARGV: job id. Deletes the lease only if this job holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def key_for(output: str) -> str:
    """The lease's key: a digest of the output's canonical URI (``/x/sub/../out`` and ``/x/out``, or
    ``s3://b/out/`` and ``s3://b/out``, are one output; URIs can be long and hold any byte)."""
    return keys.output_lease(canonical(output))


class OutputLeases:
    """Takes and gives back outputs' leases; each call is one round trip."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r, self.ttl_s = client, ttl_s
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def acquire(self, output: str, job_id: str) -> str | None:
        """Take ``output`` for ``job_id``; None when taken, else the id of the live job holding it."""
        holder = self._acquire(keys=[key_for(output)], args=[job_id, PLANNING_TTL_S, keys.job("")])
        return holder or None

    def hold(self, output: str) -> None:
        """The job's record exists: keep the lease as long as the record (it goes at the job's end)."""
        self.r.expire(key_for(output), self.ttl_s)

    def release(self, output: str, job_id: str) -> bool:
        return bool(self._release(keys=[key_for(output)], args=[job_id]))
