"""Submits that died half-way: a job record no producer will finish is ended ``failed``.

A job's record is born marked ``submitting``, beside a producer heartbeat (a key with a TTL of
CLIPBATCH_SUBMIT_STALE_S) and an entry in the set of unfinished submits, in one transaction
(``JobStore.create``). The producer refreshes the heartbeat after each batch it enqueues and clears
all three once every message is out. A producer killed in between (after the record, before or
while enqueueing) would leave a job that never ends and holds its output: nothing may run for it,
or only part of its plan. Every worker sweeps the set periodically (tasks/hooks.py) and the next
submit on the output checks its holder; a record still marked submitting whose heartbeat lapsed
(and whose submit began over CLIPBATCH_SUBMIT_STALE_S ago) is ended ``failed`` with a problem line,
its lease freed, its pending list dropped and its queued messages removed, in one claimed step.
"""
from __future__ import annotations

import logging
import time

from clipbatch.core import feed, keys
from clipbatch.core.jobs import JobStore
from clipbatch.core.leases import key_for

log = logging.getLogger("clipbatch.submits")

PROBLEM = ("the submit died before it enqueued every shard (its producer stopped for over "
           "CLIPBATCH_SUBMIT_STALE_S); resubmit with the same --output: committed shards are skipped")
# How often a worker sweeps: a quarter of the stale interval, between 1 s and a minute.
SWEEP_MIN_S, SWEEP_MAX_S = 1.0, 60.0

# KEYS: job hash, producer heartbeat, submitting set, output lease. ARGV: job id, problem, now, stale
# seconds. Returns 1 when this call ended the job (dead submit), else 0; a record that is gone, whole
# or ended leaves the set.
_END_DEAD = """
local state = redis.call('HGET', KEYS[1], 'state')
local started = redis.call('HGET', KEYS[1], 'submitting')
if not state or not started or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 or tonumber(ARGV[3]) - tonumber(started) < tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'updated_at', ARGV[3], 'problem', ARGV[2])
redis.call('HDEL', KEYS[1], 'submitting')
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""


def sweep_interval_s(stale_s: float) -> float:
    return max(SWEEP_MIN_S, min(SWEEP_MAX_S, stale_s / 4))


def end_if_dead(jobs: JobStore, job_id: str, stale_s: float) -> bool:
    """End ``job_id`` ``failed`` if its submit died (see the module's docstring); True when this call did."""
    found = jobs.r.hmget(keys.job(job_id), ["output", "queue"])
    if found[0] is None:
        jobs.r.zrem(keys.SUBMITTING, job_id)
        return False
    output, queue = found
    script = jobs.r.register_script(_END_DEAD)
    ended = script(keys=[keys.job(job_id), keys.job_producer(job_id), keys.SUBMITTING, key_for(output)],
                   args=[job_id, PROBLEM, time.time(), stale_s])
    if not ended:
        return False
    feed.Feed(jobs.r, jobs.ttl_s).drop(job_id)
    purged = feed.purge(jobs.r, queue, job_id)
    log.warning("job failed: its submit died job=%s output=%s queued_messages_removed=%d", job_id, output, purged)
    return True


def sweep(jobs: JobStore, stale_s: float) -> list[str]:
    """End every job whose submit died; returns their ids. Cheap: the set holds only unfinished submits."""
    return [j for j in jobs.r.zrange(keys.SUBMITTING, 0, -1) if end_if_dead(jobs, j, stale_s)]
