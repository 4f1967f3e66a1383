"""What runs next, decided in one place: every job kind is a declared sequence of stages.

A stage is a contiguous range of global task indices ``[base, base + size)``. Embed and score jobs
have one stage; a fine-tune has one stage per step; a curation job has clusters, assign, dedup,
boundary and write (core/curation.py). Each job kind declares its stages with a :class:`StagePlan`.

The engine (:class:`Engine`) is the only code that puts a job's work on the queue:

* :meth:`Engine.publish` sends a stage's tasks through the job's queue window (core/feed.py): the
  producer's first stage, and every later stage;
* :meth:`Engine.settle` runs once a task is committed or given up on, before the job counts it. The
  task that settles the last task of a stage claims the transition in one Redis script: the claim
  is taken once, so a duplicate or a redelivered message of a finished stage never relaunches the
  next one. With any task of the stage given up on, the claim ends the job instead: its total
  shrinks to the tasks launched so far, so the job completes, is finalised ``failed`` and frees its
  output. Otherwise the claimant plans the next stage (from storage) and :meth:`Engine.launch`
  adds its entries to the pending list and its size to the job's total, once (a claimant killed
  half-way is redelivered and finishes the launch; it holds the claim by its task index).
* :meth:`Engine.successor` keeps the window full as tasks end.

After Redis loses its state the job's messages are dropped (its record is gone) and a resubmit
finds the first unfinished stage from the markers in storage alone (each kind's resume).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import redis

from clipbatch.core import keys
from clipbatch.core.broker import CURATE_STAGE, EMBED_SHARD, FINETUNE_STEP, TRAIN_SHARD
from clipbatch.core.feed import Entry, Feed, encode
from clipbatch.core.signing import Refused

_PUBLISH_BATCH = 500  # messages between progress updates


@dataclass(frozen=True)
class Stage:
    """One stage of a job: ``size`` tasks at global indices ``base`` ...; the ``last`` stage launches
    nothing (the job's own count ends the job; its size may be unknown to the task, 0 then)."""

    name: str
    base: int
    size: int
    last: bool = False

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class NextStage:
    """A stage about to be launched: its entries, and how many tasks the job's total gains (a stage
    whose size is only learnt at launch, such as curation's write stage; 0 when the total held it)."""

    name: str
    entries: list[Entry]
    grows_total: int = 0


class StagePlan(Protocol):
    """A job kind's stages: the stage holding a task, and the stage after one (None after the last)."""

    def stage_of(self, index: int) -> Stage: ...

    def next_stage(self, stage: Stage) -> NextStage | None: ...


@dataclass(frozen=True)
class OneStage:
    """Embed and score jobs: every input shard is a task of one stage (its size: the job's total)."""

    size: int = 0

    def stage_of(self, index: int) -> Stage:
        return Stage("shards", 0, self.size, last=True)

    def next_stage(self, stage: Stage) -> NextStage | None:
        return None


@dataclass(frozen=True)
class Steps:
    """A fine-tune: step k is stage k, one task training on shard k mod len(shards); it starts from
    step k - 1's checkpoint, so a step runs only once the one before it is committed."""

    shards: tuple[str, ...]
    steps: int

    def stage_of(self, index: int) -> Stage:
        return Stage(f"step{index}", index, 1, last=index + 1 >= self.steps)

    def next_stage(self, stage: Stage) -> NextStage | None:
        k = stage.end
        return NextStage(f"step{k}", [(k, self.shards[k % len(self.shards)], None)]) if k < self.steps else None


def task_of(kind: str, entry: Entry) -> str:
    """The task that runs ``entry`` of a job of ``kind``: in a curation job a tar's input
    (``output#write=j``) goes to the write task and every other stage's to the stage task."""
    if kind == "shards":
        return TRAIN_SHARD if entry[1].rpartition("#")[2].startswith("write=") else CURATE_STAGE
    return FINETUNE_STEP if kind == "finetune" else EMBED_SHARD


# Lua shared by the scripts: give KEYS[i] the job hash's remaining TTL (ARGV[ttl] when it has none).
_EXPIRE_WITH_JOB = """
local function expire_with_job(i, ttl)
  if redis.call('PTTL', KEYS[i]) ~= -1 then return end
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then redis.call('PEXPIRE', KEYS[i], left) else redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# KEYS: job hash, stage's settled set, stage's given-up set, stage's claim. ARGV: index, stage size,
# '1' when given up on, ttl, the stage's end (the job's total if it ends here).
# Returns 'gone' (no job), 'wait' (stage unfinished), 'done' (transition already made or claimed by
# another task), 'launch' (this task holds the claim and must launch the next stage), 'ended'.
_SETTLE = _EXPIRE_WITH_JOB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
-- a stage before the one the job started at (a resubmit) was complete in storage: nothing to launch
if tonumber(ARGV[1]) < tonumber(redis.call('HGET', KEYS[1], 'stages_from') or '0') then return 'done' end
redis.call('SADD', KEYS[2], ARGV[1])
expire_with_job(2, ARGV[4])
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[3], ARGV[1])
  expire_with_job(3, ARGV[4])
end
if redis.call('SCARD', KEYS[2]) < tonumber(ARGV[2]) then return 'wait' end
local claim = redis.call('GET', KEYS[4])
if claim == 'claimed:' .. ARGV[1] then return 'launch' end
if claim then return 'done' end
if redis.call('SCARD', KEYS[3]) > 0 then
  redis.call('SET', KEYS[4], 'ended')
  expire_with_job(4, ARGV[4])
  redis.call('HSET', KEYS[1], 'shards_total', ARGV[5])
  return 'ended'
end
redis.call('SET', KEYS[4], 'claimed:' .. ARGV[1])
expire_with_job(4, ARGV[4])
return 'launch'
"""

# KEYS: job hash, stage's claim, pending list. ARGV: claimant index, tasks the total gains, ttl, entries...
# Pushes the next stage's entries and grows the total once (never for a cancelled job); 1 when it did.
_LAUNCH = _EXPIRE_WITH_JOB + """
if redis.call('GET', KEYS[2]) ~= 'claimed:' .. ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == false or state == 'cancelled' then return 0 end
if #ARGV > 3 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 4))
  expire_with_job(3, ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'shards_total', ARGV[2])
redis.call('SET', KEYS[2], 'launched', 'KEEPTTL')
return 1
"""


class Engine:
    """The one place a job's tasks go out; each call is a round trip or a pipeline."""

    def __init__(self, client: redis.Redis, ttl_s: int, app: Any, window: int) -> None:
        self.r, self.ttl_s, self.app, self.window = client, ttl_s, app, max(1, window)
        self.feed = Feed(client, ttl_s)
        self._settle = client.register_script(_SETTLE)
        self._launch = client.register_script(_LAUNCH)

    def publish(self, job_id: str, kind: str, queue: str, entries: list[Entry],
                progress: Callable[[int], None] | None = None) -> None:
        """A job's first stage: the entries past the window to the pending list first (a fast task
        may ask for its successor before the window is out), then the first ``window`` to the broker."""
        self.feed.load(job_id, entries[self.window:], progress)
        with self.app.producer_or_acquire() as producer:
            for start in range(0, min(self.window, len(entries)), _PUBLISH_BATCH):
                batch = entries[start:min(self.window, start + _PUBLISH_BATCH)]
                for entry in batch:
                    self._send(job_id, kind, queue, entry, producer)
                if progress is not None:
                    progress(len(batch))

    def seed(self, job_id: str, stage: Stage, settled: list[int]) -> None:
        """A resubmit starting at ``stage``: the stages before it were complete in storage (a duplicate of
        one of their tasks launches nothing), and its tasks already committed are settled."""
        pipe = self.r.pipeline()
        pipe.hset(keys.job(job_id), "stages_from", stage.base)
        if settled:
            pipe.sadd(keys.job_stage(job_id, stage.name), *settled)
            pipe.expire(keys.job_stage(job_id, stage.name), self.ttl_s)
        pipe.execute()

    def settle(self, job_id: str, kind: str, queue: str, index: int, plan: StagePlan, given_up: bool,
               check: Callable[[Entry], None] | None = None,
               refused: Callable[[Entry | None, Exception], None] | None = None) -> str:
        """Task ``index`` is committed (or given up on): launch the next stage if it was its stage's
        last, once. Call it before the job counts the task (the job must never look complete between
        two stages). ``check`` and ``refused``: as for :meth:`successor`. Returns what happened: 'wait',
        'done', 'launched', 'last', 'ended' or 'gone'."""
        stage = plan.stage_of(index)
        if stage.last:
            return "last"
        keys_ = [keys.job(job_id), keys.job_stage(job_id, stage.name), keys.job_stage_given_up(job_id, stage.name),
                 keys.job_stage_claim(job_id, stage.name)]
        outcome = self._settle(keys=keys_, args=[index, stage.size, "1" if given_up else "0", self.ttl_s, stage.end])
        if outcome != "launch":
            return outcome
        nxt = plan.next_stage(stage)
        if nxt is None:
            return "last"
        pushed = self._launch(keys=[keys.job(job_id), keys_[3], keys.job_pending(job_id)],
                              args=[index, nxt.grows_total, self.ttl_s, *map(encode, nxt.entries)])
        # The claimant's slots of the window: its own successor (run_shard) fills one, these the rest.
        # Taken per (stage, slot): a redelivered claimant publishes the same entries again, never others.
        for slot in range(self.window - 1):
            self.successor(job_id, kind, queue, f"{nxt.name}+{slot}", check, refused)
        return "launched" if pushed else "done"

    def successor(self, job_id: str, kind: str, queue: str, parent: int | str,
                  check: Callable[[Entry], None] | None = None,
                  refused: Callable[[Entry | None, Exception], None] | None = None) -> None:
        """Keep the window full: publish the pending entry ``parent`` takes (the same one however often
        it asks until it went out: a parent that died in between publishes it on its redelivery).

        ``check`` (signing on) raises Refused for an entry no trusted key vouches for; it, or a malformed
        entry, goes to ``refused`` (never run) and the next one is taken under the parent's next slot
        (``3/1``, ``3/2``: a redelivery takes the same ones)."""
        for slot in itertools.count():
            key = parent if slot == 0 else f"{parent}/{slot}"
            entry = None
            try:
                entry = self.feed.successor(job_id, key)
                if entry is None:
                    return
                if check is not None:
                    check(entry)
            except (Refused, ValueError) as why:  # ValueError: not an entry at all
                if refused is not None:
                    refused(entry, why)
                continue
            self._send(job_id, kind, queue, entry)
            self.feed.sent(job_id, key)
            return

    def _send(self, job_id: str, kind: str, queue: str, entry: Entry, producer: Any = None) -> None:
        self.app.send_task(task_of(kind, entry), args=[job_id, *entry], queue=queue, producer=producer)
