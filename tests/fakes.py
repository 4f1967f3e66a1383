"""In-memory stand-ins for the services, so a rule of the shard life cycle is tested in milliseconds
with no Redis, S3 or worker process (as dramatiq's StubBroker stands in for its brokers).

* The job store and the feed are the real classes (core/jobs.py ``JobStore``, core/feed.py ``Feed``,
  and core/leases.py ``OutputLeases``, which the job's end uses) over fakeredis: an in-memory Redis
  that runs their Lua scripts. The fakes therefore cannot drift from what they stand in for;
  tests/test_fakes.py runs one sequence of operations on fakeredis and on the real Redis and
  compares every answer (marked integration: it needs the real one).
* The broker records what ``send_task`` publishes, in order, instead of sending it.
* Storage is a local folder: core/storage.py's own backend (an exclusive create by ``link()``).

``install(monkeypatch)`` puts a fresh store and broker where the worker side looks for them
(``tasks/context.job_store()`` and the workers' Celery app's ``send_task``), until the test ends.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fakeredis
import pytest

from clipbatch.core.feed import Feed
from clipbatch.core.jobs import JobStore

TTL_S = 3600  # the job TTL the fakes run with: long enough that nothing expires during a test


def memory_redis() -> fakeredis.FakeRedis:
    """A Redis of its own, in this process's memory, that runs Lua scripts (``fakeredis[lua]``)."""
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)


def job_store(ttl_s: int = TTL_S) -> JobStore:
    """The real job store over an in-memory Redis."""
    return JobStore(memory_redis(), ttl_s)


@dataclass(frozen=True)
class Message:
    """One message the code under test published: the task's name, its arguments and its queue."""

    task: str
    args: list[Any]
    queue: str | None


@dataclass
class StubBroker:
    """Celery's ``send_task`` (and the ``producer_or_acquire`` that core/stages.Engine.publish uses), recording
    each message in order instead of sending it; nothing runs until a test runs it."""

    messages: list[Message] = field(default_factory=list)

    def send_task(self, name: str, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
                  **options: Any) -> Message:
        if kwargs:
            raise ValueError(f"{name}: clipbatch's messages carry positional arguments only, got {kwargs}")
        message = Message(name, list(args or ()), options.get("queue"))
        self.messages.append(message)
        return message

    @contextmanager
    def producer_or_acquire(self, producer: Any = None) -> Iterator[Any]:
        yield producer

    def sent(self, task: str) -> list[Message]:
        """The messages of one task, in the order they were published."""
        return [m for m in self.messages if m.task == task]


@dataclass(frozen=True)
class Stubs:
    jobs: JobStore
    broker: StubBroker

    @property
    def feed(self) -> Feed:
        """The feed over the same in-memory Redis, as tasks/lifecycle.py builds it."""
        return Feed(self.jobs.r, self.jobs.ttl_s)


def install(monkeypatch: pytest.MonkeyPatch) -> Stubs:
    """Give the worker side a fresh in-memory job store and a stub broker for this test."""
    from clipbatch.tasks import context
    from clipbatch.tasks.app import app

    stubs = Stubs(job_store(), StubBroker())
    monkeypatch.setitem(context._store, os.getpid(), stubs.jobs)  # what job_store() returns in this process
    monkeypatch.setattr(app, "send_task", stubs.broker.send_task)
    return stubs
