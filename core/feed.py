"""A job's queue window: at most ``window`` of its shard messages sit in the broker at a time.

A Celery message costs about 1.1 KB of Redis however small its arguments, so a job of 100,000
shards queued whole would hold ~110 MB. Instead the producer publishes the first ``window``
messages and appends the rest to the job's *pending* list as compact entries
(``[index, input, version]``, ~100 bytes; with signing on, the producer's signature follows as a fourth
element, ~350 bytes more: core/signing.py). Each shard message that reaches its end (committed,
found committed, lost a race, dead-lettered) publishes one successor taken from the pending list,
so the window stays full until the list is empty. What goes out, and when, is decided by the stage
engine (core/stages.py); this module keeps the list.

Taking a successor is idempotent per parent: the script records which entry parent ``p`` took
(``fed`` hash), so a redelivered parent (its worker died after taking it, before the message went
out) publishes the same entry, and never takes a second one. Once the message is in the broker the
entry is marked sent, and a duplicate of the parent publishes nothing: a duplicate message does not
walk the rest of the job's chain of successors. The pending list and the ``fed`` hash expire with the job's hash.

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
_SENT = "!"  # a fed entry so marked is in the broker

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


# KEYS: fed hash. ARGV: parent. Marks the entry parent took as sent.
_MARK_SENT = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, 1) ~= '!' then redis.call('HSET', KEYS[1], ARGV[1], '!' .. v) end
return 1
"""


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
        self._sent = client.register_script(_MARK_SENT)

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
        pipe.rpush(keys.job_pending(job_id), *batch)
        pipe.expire(keys.job_pending(job_id), self.ttl_s)
        pipe.execute()
        if progress is not None:
            progress(len(batch))
        return len(batch)

    def successor(self, job_id: str, parent: int | str) -> Entry | None:
        """The entry ``parent`` publishes next (the same one however often it asks, until :meth:`sent`
        records that it went out), or None."""
        raw = self._next(keys=[keys.job(job_id), keys.job_pending(job_id), keys.job_fed(job_id)], args=[parent, self.ttl_s])
        return decode(raw) if raw and raw[:1] not in (_SENT, _SENT.encode()) else None

    def sent(self, job_id: str, parent: int | str) -> None:
        """``parent``'s successor is in the broker: a duplicate of ``parent`` publishes nothing more."""
        self._sent(keys=[keys.job_fed(job_id)], args=[parent])

    def remaining(self, job_id: str) -> int:
        return int(self.r.llen(keys.job_pending(job_id)))

    def drop(self, job_id: str) -> None:
        """Forget the job's unpublished entries (a cancel)."""
        self.r.delete(keys.job_pending(job_id), keys.job_fed(job_id))


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
