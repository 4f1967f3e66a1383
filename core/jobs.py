"""Job records in Redis: one hash per job plus the sets that make counting idempotent.

Counting a shard is idempotent (a shard index enters the ``done`` set once), so whoever
reports a committed shard -- the attempt that won, a loser, or a redelivery that found the
marker -- moves the counters at most once. Storage stays the durable truth.

Every key a job owns expires: the hash gets the job's TTL at creation, and each other key gets
the hash's remaining TTL in the same script that creates it (an EXPIRE before a key exists does
nothing). The dead-letter list is global, so it is capped instead (``keys.DEAD_LETTERS_MAX``).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from clipbatch.core import keys, merged, scores
from clipbatch.core.config import DEFAULT_SUBMIT_STALE_S, redact
from clipbatch.core.keys import JobState
from clipbatch.core.signing import SPEC_SIGNATURE

if TYPE_CHECKING:
    from clipbatch.core.signing import Signer

_COUNTERS = ("shards_total", "shards_done", "shards_failed", "shards_skipped", "shards_rescored", "samples_done",
             "samples_failed")

# Lua shared by the scripts: give KEYS[i] the job hash's remaining TTL (ARGV[ttl_arg] seconds
# when the hash has none) unless it has one already. Run right after writing KEYS[i].
_EXPIRE_WITH_JOB = """
local function expire_with_job(i, ttl_arg)
  if redis.call('PTTL', KEYS[i]) ~= -1 then return end
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then redis.call('PEXPIRE', KEYS[i], left) else redis.call('EXPIRE', KEYS[i], ARGV[ttl_arg]) end
end
"""

# KEYS: job hash, done set, failed hash, commits hash, merged hash. ARGV: index, samples ok, samples
# failed, ttl, then (embed/score shards) the commit's record, '1' when its stats are to be merged (the
# shard was not committed before this job), its histogram's sum and sumsq, then field/count pairs
# (count, b:<bin>, t:<threshold>, e:<reason>, ok, failed, n). All of it happens once per index, with
# the counting. Returns {done, failed, total} or -1 when the job record is gone.
_REPORT_DONE = _EXPIRE_WITH_JOB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  expire_with_job(2, 4)
  if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'shards_failed', -1) end
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
  redis.call('HINCRBY', KEYS[1], 'samples_done', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'samples_failed', ARGV[3])
  if #ARGV > 4 then
    redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
    expire_with_job(4, 4)
    if ARGV[6] == '1' then
      redis.call('HINCRBYFLOAT', KEYS[5], 'sum', ARGV[7])
      redis.call('HINCRBYFLOAT', KEYS[5], 'sumsq', ARGV[8])
      for i = 9, #ARGV, 2 do redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1]) end
      expire_with_job(5, 4)
    end
  end
end
return {tonumber(redis.call('HGET', KEYS[1], 'shards_done')),
        tonumber(redis.call('HGET', KEYS[1], 'shards_failed')),
        tonumber(redis.call('HGET', KEYS[1], 'shards_total'))}
"""

# KEYS: job hash, done set, failed hash. ARGV: index, reason, ttl.
_REPORT_FAILED = _EXPIRE_WITH_JOB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 and redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 1 then
  expire_with_job(3, 3)
  redis.call('HINCRBY', KEYS[1], 'shards_failed', 1)
end
return {tonumber(redis.call('HGET', KEYS[1], 'shards_done')),
        tonumber(redis.call('HGET', KEYS[1], 'shards_failed')),
        tonumber(redis.call('HGET', KEYS[1], 'shards_total'))}
"""

# KEYS: job hash. ARGV: new state, now. Moves a non-terminal job only.
_SET_STATE = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == false or s == 'succeeded' or s == 'failed' or s == 'cancelled' then return 0 end
if ARGV[1] == 'running' and s ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
return 1
"""

# KEYS: job hash. ARGV: step, loss. Writes only while the job exists (a new hash would never expire).
_SET_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'loss', ARGV[2])
return 1
"""

# KEYS: job hash. ARGV: problem. Writes only while the job exists.
_SET_PROBLEM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'problem', ARGV[1])
return 1
"""

# KEYS: job hash, deliveries hash. ARGV: index, ttl. Returns the count so far.
_COUNT_DELIVERY = _EXPIRE_WITH_JOB + """
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
expire_with_job(2, 2)
return n
"""


@dataclass(frozen=True)
class Counted:
    """One committed embed/score shard as the job's totals take it (``JobStore.report_done``)."""

    record: list[Any]  # merged.shard_record: attempt, files, score bounds, counts
    stats: dict[str, Any]  # the shard's stats/{i}.json
    before: bool  # committed before this job (a plan's unfinished move): the saved totals hold it
    marker: dict[str, Any] | None = None  # the commit's marker, for the index the job's end writes (core/marker_index.py)

    def args(self) -> list[Any]:
        hist = self.stats.get("clip_score") or scores.merge([])
        pairs: dict[str, int] = {"count": hist["count"], "n": 1}
        pairs.update({f"b:{b}": c for b, c in hist["bins"].items()})
        pairs.update({f"t:{t}": c for t, c in hist["at_least"].items()})
        pairs.update({f"e:{r}": c for r, c in self.stats.get("error_reasons", {}).items()})
        record = json.dumps({"record": self.record, "before": self.before, "marker": self.marker})
        flat = [x for kv in pairs.items() for x in kv]
        return [record, "0" if self.before else "1", repr(float(hist["sum"])), repr(float(hist["sumsq"])), *flat]


def _totals(fields: dict[str, str]) -> merged.Totals:
    """The merged hash back as totals (covers left empty: the commits hash names the shards)."""
    hist = scores.merge([])
    hist.update(count=int(fields.get("count", 0)), sum=float(fields.get("sum", 0)), sumsq=float(fields.get("sumsq", 0)))
    reasons: Counter = Counter()
    for name, value in fields.items():
        kind, _, key = name.partition(":")
        if kind == "b":
            hist["bins"][key] = int(value)
        elif kind == "t":
            hist["at_least"][key] = int(value)
        elif kind == "e":
            reasons[key] = int(value)
    return merged.Totals({}, hist, reasons)


class JobStore:
    """Reads and writes job records; each write helper is one round trip."""

    def __init__(self, client: redis.Redis, ttl_s: int, dead_letters_max: int = keys.DEAD_LETTERS_MAX,
                 submit_stale_s: int = DEFAULT_SUBMIT_STALE_S) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self.submit_stale_s = submit_stale_s
        self.dead_letters_max = dead_letters_max
        self._done = client.register_script(_REPORT_DONE)
        self._failed = client.register_script(_REPORT_FAILED)
        self._state = client.register_script(_SET_STATE)
        self._progress = client.register_script(_SET_PROGRESS)
        self._problem = client.register_script(_SET_PROBLEM)
        self._delivery = client.register_script(_COUNT_DELIVERY)

    def create(self, job_id: str, spec: dict[str, Any], shards_total: int, committed: dict[int, dict],
               shards_rescored: int = 0, signer: Signer | None = None) -> None:
        """Write the job hash; shards already committed in storage count as done and skipped. With a
        ``signer`` (signing on) the spec is signed as stored, in the field beside it.

        The record is born marked ``submitting``, with the producer's heartbeat and an entry in the
        set of unfinished submits, in the same transaction: a producer killed at any point after it
        leaves a record the sweep of dead submits ends (core/submits.py)."""
        now = time.time()
        record: dict[str, Any] = {
            "job_id": job_id,
            "kind": spec["kind"],
            "spec": json.dumps(spec),
            "output": spec["output"],
            "queue": spec["queue"],
            "state": JobState.QUEUED.value,
            "created_at": now,
            "updated_at": now,
            "shards_total": shards_total,
            "shards_done": len(committed),
            "shards_failed": 0,
            "shards_skipped": len(committed),
            "shards_rescored": shards_rescored,
            "samples_done": sum(m["samples_ok"] for m in committed.values()),
            "samples_failed": sum(m["samples_failed"] for m in committed.values()),
            # which commits the plan kept: the job's end checks the saved totals hold exactly these
            "kept_digest": merged.digest((i, m.get("attempt")) for i, m in committed.items()),
            "submitting": now,
        }
        if signer is not None:
            record[SPEC_SIGNATURE] = signer.spec(job_id, record["spec"])
        pipe = self.r.pipeline()
        pipe.hset(keys.job(job_id), mapping=record)
        pipe.expire(keys.job(job_id), self.ttl_s)
        if committed:
            pipe.sadd(keys.job_done(job_id), *committed)
            pipe.expire(keys.job_done(job_id), self.ttl_s)
        pipe.set(keys.job_producer(job_id), "1", ex=self.submit_stale_s)
        pipe.zadd(keys.SUBMITTING, {job_id: now})
        pipe.zadd(keys.JOBS_INDEX, {job_id: now})
        pipe.zremrangebyscore(keys.JOBS_INDEX, "-inf", now - self.ttl_s)  # their records have expired
        pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(keys.job(job_id))
        if not raw:
            return None
        status: dict[str, Any] = {k: (int(raw.get(k, 0) or 0)) for k in _COUNTERS}
        status.update(
            job_id=job_id,
            kind=raw["kind"],
            state=raw["state"],
            output=raw["output"],
            queue=raw["queue"],
            created_at=float(raw["created_at"]),
            updated_at=float(raw["updated_at"]),
            failures={int(k): v for k, v in self.r.hgetall(keys.job_failed(job_id)).items()},
        )
        if "step" in raw:  # fine-tune jobs publish their last committed step and loss
            status.update(step=int(raw["step"]), loss=float(raw["loss"]) if raw["loss"] else None)
        if "problem" in raw:  # why a job that ran to its end did not succeed (nothing embedded)
            status["problem"] = raw["problem"]
        return status

    def spec(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(keys.job(job_id), "spec")
        return json.loads(raw) if raw else None

    def signed_spec(self, job_id: str) -> tuple[str, str | None] | None:
        """The record's spec as stored (a JSON string) and its signature (None when unsigned); None
        when the record is gone."""
        raw, signature = self.r.hmget(keys.job(job_id), ["spec", SPEC_SIGNATURE])
        return None if raw is None else (raw, signature)

    def report_done(self, job_id: str, index: int, samples_ok: int, samples_failed: int,
                    counted: Counted | None = None) -> bool:
        """Count a committed shard once; True when every shard is now accounted for.

        ``counted`` (embed and score shards): its commit's record, merged into the job's totals in the
        same script, so a duplicate report never counts twice."""
        args = [index, samples_ok, samples_failed, self.ttl_s, *(counted.args() if counted else ())]
        keys_ = [*keys.job_keys(job_id)[:3], keys.job_commits(job_id), keys.job_merged(job_id)]
        res = self._done(keys=keys_, args=args)
        return res != -1 and res[0] + res[1] == res[2]

    def job_shards(self, job_id: str, status: dict[str, Any]) -> merged.JobShards:
        """What the job's end needs from Redis: the done set, the shards counted, their merged stats."""
        pipe = self.r.pipeline()
        pipe.smembers(keys.job_done(job_id))
        pipe.hgetall(keys.job_commits(job_id))
        pipe.hgetall(keys.job_merged(job_id))
        pipe.hget(keys.job(job_id), "kept_digest")
        done, commits, fields, kept = pipe.execute()
        counted = {int(i): json.loads(raw) for i, raw in commits.items()}
        return merged.JobShards({int(i) for i in done}, counted, _totals(fields), kept,
                                (status["samples_done"], status["samples_failed"]))

    def set_progress(self, job_id: str, step: int, loss: float | None) -> None:
        """A chain job's last committed step and its loss, shown by ``status``."""
        self._progress(keys=[keys.job(job_id)], args=[step, "" if loss is None else loss])

    def set_problem(self, job_id: str, problem: str) -> None:
        """Why a job that ran to its end did not succeed, shown by ``status``; set before its final state."""
        self._problem(keys=[keys.job(job_id)], args=[problem[:2000]])

    def count_delivery(self, job_id: str, index: int) -> int:
        """Count one more start of shard ``index``; returns the count so far."""
        return int(self._delivery(keys=[keys.job(job_id), keys.job_deliveries(job_id)], args=[index, self.ttl_s]))

    def dead_letter(self, job_id: str, index: int, input_uri: str, reason: str) -> bool:
        """Give up on a shard: record it in the dead-letter list and as failed in its job.

        Returns True when every shard of the job is now accounted for. One round trip; the list
        keeps the newest ``dead_letters_max`` records.
        """
        reason = reason[:2000]
        record = {"job_id": job_id, "index": index, "input": input_uri, "reason": reason, "at": time.time()}
        pipe = self.r.pipeline()
        pipe.lpush(keys.DEAD_LETTERS, json.dumps(record))
        pipe.ltrim(keys.DEAD_LETTERS, 0, self.dead_letters_max - 1)
        self._failed(keys=keys.job_keys(job_id)[:3], args=[index, reason, self.ttl_s], client=pipe)
        res = pipe.execute()[-1]
        return res != -1 and res[0] + res[1] == res[2]

    def record_refused(self, job_id: str, index: Any, input_uri: Any, reason: str) -> None:
        """Record a refused message or entry (core/signing.py) in the dead-letter list only: it is not
        one of the job's shards, so no job changes for it."""
        record = {"job_id": redact(str(job_id))[:200], "index": index if isinstance(index, int) else -1,
                  "input": redact(str(input_uri))[:2000], "reason": redact(reason)[:2000], "at": time.time()}
        pipe = self.r.pipeline()
        pipe.lpush(keys.DEAD_LETTERS, json.dumps(record))
        pipe.ltrim(keys.DEAD_LETTERS, 0, self.dead_letters_max - 1)
        pipe.execute()

    def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self.r.lrange(keys.DEAD_LETTERS, 0, limit - 1)]

    def set_state(self, job_id: str, state: JobState) -> bool:
        """Move a job that is not finished yet; 'running' only from 'queued'."""
        return bool(self._state(keys=[keys.job(job_id)], args=[state.value, time.time()]))

    def drop_counted(self, job_id: str) -> None:
        """Free what only the job's end reads (each counted shard's record and marker, the merged totals)
        once the job has ended, rather than for the job's TTL."""
        self.r.delete(keys.job_commits(job_id), keys.job_merged(job_id))

    def done_indices(self, job_id: str) -> set[int]:
        """The shard indices counted as committed."""
        return {int(i) for i in self.r.smembers(keys.job_done(job_id))}

    def claim_finalize(self, job_id: str, lease_s: int) -> bool:
        """Claim the right to finalise the job for ``lease_s`` seconds; False while another holds it."""
        return bool(self.r.set(keys.job_finalizing(job_id), "1", nx=True, ex=lease_s))

    def is_complete(self, status: dict[str, Any]) -> bool:
        return status["shards_done"] + status["shards_failed"] >= status["shards_total"]

    def list_ids(self, limit: int = 50) -> list[str]:
        return list(self.r.zrevrange(keys.JOBS_INDEX, 0, limit - 1))

    def mark_submitting(self, job_id: str) -> None:
        """The producer is still enqueueing the job's messages: its heartbeat lives another
        CLIPBATCH_SUBMIT_STALE_S seconds (it refreshes it after each batch)."""
        self.r.set(keys.job_producer(job_id), "1", ex=self.submit_stale_s)

    def mark_submitted(self, job_id: str) -> None:
        """The producer enqueued everything: the submit is whole."""
        pipe = self.r.pipeline()
        pipe.hdel(keys.job(job_id), "submitting")
        pipe.delete(keys.job_producer(job_id))
        pipe.zrem(keys.SUBMITTING, job_id)
        pipe.execute()
