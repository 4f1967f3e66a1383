"""A job's queue window: at most ``window`` of its shard messages sit in the broker at a time.

A Celery message costs about 1.1 KB of Redis however small its arguments, so a job of 100,000
shards queued whole would hold ~110 MB. Instead the producer publishes the first ``window``
messages and appends the rest to the job's *pending* list as compact entries
(``[index, input, version]``, ~100 bytes; with signing on, the producer's signature follows as a fourth
element, ~350 bytes more: core/signing.py). Each shard message that reaches its end (committed,
found committed, lost a race, dead-lettered) publishes one successor taken from the pending list,
so the window stays full until the list is empty.

Taking a successor is idempotent per parent: the script records which entry parent ``p`` took
(``fed`` hash), so a redelivered parent (its worker died after publishing, before the ack)
publishes the same entry again (a duplicate message, which the commit protocol absorbs) and
never takes a second one. The pending list and the ``fed`` hash expire with the job's hash.

:func:`publish` is the one way a job's messages go out: the producer's first messages, and the stages
of a curation job, which the task completing a stage publishes (tasks/curation.py). A pending entry
says which task runs it (:func:`task_of`: a curation job's stage tasks and write tasks share a list).

Cancelling drops the pending list and removes the job's queued messages from the broker's list
(:func:`purge`), so queue-length autoscaling (KEDA reads the list's length) stops counting them.
"""
from __future__ import annotations

import base64
import json
from typing import Callable, Iterable, Iterator

import redis

from clipbatch.core import keys, signing

# (index, input URI, input version[, signature]) — a shard message's arguments after the job id; the
# producer's signature of the entry when signing is on (core/signing.py)
Entry = tuple[int, str, "str | None"] | tuple[int, str, "str | None", str]
_BATCH = 5_000  # entries per round trip when loading the pending list
_PUBLISH_BATCH = 500  # messages between progress updates

# KEYS: job hash, pending list, fed hash. ARGV: parent, ttl. Returns the entry parent takes, or false.
_NEXT = """
local taken = redis.call('HGET', KEYS[3], ARGV[1])
if taken then return taken end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local entry = redis.call('LPOP', KEYS[2])
if not entry then return false end
redis.call('HSET', KEYS[3], ARGV[1], entry)
if redis.call('PTTL', KEYS[3]) == -1 then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then redis.call('PEXPIRE', KEYS[3], left) else redis.call('EXPIRE', KEYS[3], ARGV[2]) end
end
return entry
"""


def pending_key(job_id: str) -> str:
    """List: the job's shard entries not yet published, in plan order."""
    return f"{keys.PREFIX}:job:{job_id}:pending"


def fed_key(job_id: str) -> str:
    """Hash: parent (shard index) -> the pending entry it published as its successor."""
    return f"{keys.PREFIX}:job:{job_id}:fed"


def encode(entry: Entry) -> str:
    return json.dumps(list(entry), separators=(",", ":"))


def decode(raw: str | bytes) -> Entry:
    """A pending entry back as a tuple; ValueError naming it when it is not one."""
    try:
        fields = json.loads(raw)
        if isinstance(fields, list) and len(fields) in (3, 4):
            return (int(fields[0]), *fields[1:])
    except (ValueError, TypeError):
        pass
    raise ValueError(f"pending entry {str(raw)[:300]!r} is not [index, input, version(, signature)]")


class Feed:
    """The pending side of every job's queue window; each call is one round trip or a pipeline."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._next = client.register_script(_NEXT)

    def load(self, job_id: str, entries: Iterable[Entry], progress: Callable[[int], None] | None = None) -> int:
        """Append ``entries`` to the pending list in batches; returns how many went in."""
        count, batch = 0, []
        for entry in entries:
            batch.append(encode(entry))
            if len(batch) == _BATCH:
                count += self._push(job_id, batch, progress)
                batch = []
        if batch:
            count += self._push(job_id, batch, progress)
        return count

    def _push(self, job_id: str, batch: list[str], progress: Callable[[int], None] | None) -> int:
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(pending_key(job_id), *batch)
        pipe.expire(pending_key(job_id), self.ttl_s)
        pipe.execute()
        if progress is not None:
            progress(len(batch))
        return len(batch)

    def successor(self, job_id: str, parent: int | str) -> Entry | None:
        """The entry ``parent`` publishes next (the same one however often it asks), or None."""
        raw = self._next(keys=[keys.job(job_id), pending_key(job_id), fed_key(job_id)], args=[parent, self.ttl_s])
        return decode(raw) if raw else None

    def remaining(self, job_id: str) -> int:
        return int(self.r.llen(pending_key(job_id)))

    def drop(self, job_id: str) -> None:
        """Forget the job's unpublished entries (a cancel)."""
        self.r.delete(pending_key(job_id), fed_key(job_id))


WINDOWED = ("embed", "score", "shards")  # the job kinds whose messages go through the window


def task_of(kind: str, entry: Entry) -> str:
    """The task a job of a WINDOWED ``kind`` runs ``entry`` with: the shard task, or, in a curation job,
    the stage task for a stage's input (``output#stage=n``) and the write task for a tar's."""
    from clipbatch.core.broker import CURATE_STAGE, EMBED_SHARD, TRAIN_SHARD

    if kind == "shards":
        return TRAIN_SHARD if entry[1].rpartition("#")[2].startswith("write=") else CURATE_STAGE
    return EMBED_SHARD


def publish(app, feed: Feed, job_id: str, queue: str, entries: list[Entry], window: int,
            task: Callable[[Entry], str], progress: Callable[[int], None] | None = None) -> None:
    """The job's messages through its queue window: the entries past the first ``window`` go to the
    pending list first (a fast shard may ask for its successor before the window is out), then the first
    ``window`` to the broker, each as ``task(entry)``."""
    feed.load(job_id, entries[window:], progress)
    with app.producer_or_acquire() as producer:
        for start in range(0, min(window, len(entries)), _PUBLISH_BATCH):
            batch = entries[start:min(window, start + _PUBLISH_BATCH)]
            for entry in batch:
                app.send_task(task(entry), args=[job_id, *entry], queue=queue, producer=producer)
            if progress is not None:
                progress(len(batch))


# kombu's Redis transport keeps a queue's messages in the list named after the queue, and a
# message sent with a priority in the list suffixed with "\x06\x16" and the priority step.
_PRIORITY_SUFFIXES = ("",) + tuple(f"\x06\x16{p}" for p in (3, 6, 9))


def message_job(raw: str | bytes) -> str | None:
    """The job id a queued kombu message belongs to (its first argument), or None if not ours.
    A signed message's body is read inside its signature, which is not checked (it is only dropped)."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if message.get("content-type") == signing.SIGNED_CONTENT_TYPE:
            body = signing.signed_body(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not args:
        return None
    first = args[0]
    if isinstance(first, dict):  # messages of an older producer carried the whole shard spec
        first = first.get("job_id")
    return first if isinstance(first, str) else None


def _queued(client: redis.Redis, queue: str, chunk: int = 1_000) -> Iterator[tuple[str, bytes]]:
    for name in (queue + suffix for suffix in _PRIORITY_SUFFIXES):
        start = 0
        while True:
            found = client.lrange(name, start, start + chunk - 1)
            if not found:
                break
            yield from ((name, raw) for raw in found)
            start += chunk


def purge(client: redis.Redis, queue: str, job_id: str) -> int:
    """Remove the job's messages waiting in ``queue`` (not those a worker holds); returns how many.

    Messages are unique (each carries its task id), so ``LREM`` of one exact value removes that
    message only; one a worker took meanwhile is simply not found. Other jobs' messages stay.
    """
    doomed = [(name, raw) for name, raw in _queued(client, queue) if message_job(raw) == job_id]
    pipe = client.pipeline(transaction=False)
    for name, raw in doomed:
        pipe.lrem(name, 1, raw)
    return sum(pipe.execute()) if doomed else 0
