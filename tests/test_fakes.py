"""The in-memory fakes of tests/fakes.py answer as the real services do.

Given one seeded sequence of job-store, feed and lease operations (counting, dead-lettering, state
moves, redeliveries, a job record lost as when Redis loses its state), when it runs on the real
classes over fakeredis and over the real Redis, then every answer is the same, and so is every key
left behind: its type, its value and whether it expires. The stub broker takes Celery's arguments.
"""
from __future__ import annotations

import dataclasses

import inspect
import json
import random
import re
from types import SimpleNamespace
from typing import Any, Callable
from urllib.parse import urlparse, urlunparse

import pytest
import redis
from celery import Celery

from clipbatch.core import jobs as jobs_module
from clipbatch.core import keys
from clipbatch.core.feed import Feed
from clipbatch.core.jobs import Counted, JobStore
from clipbatch.core.keys import JobState
from clipbatch.core.leases import OutputLeases
from clipbatch.core.scores import histogram
from tests import fakes

CROSS_CHECK_DB = 12  # flushed by this test: the comparison covers the whole keyspace
SEEDS = range(4)
STEPS = 80
JOBS = ("job-a", "job-b")
SHARDS = 5


# operation -> weight: mostly what a worker does; a lost record (Redis losing its state) now and then
WEIGHTS = [("report_done", 6), ("report_counted", 6), ("dead_letter", 3), ("count_delivery", 3), ("set_state", 2),
           ("successor", 4), ("get", 2), ("job_shards", 2), ("set_progress", 1), ("set_problem", 1),
           ("claim_finalize", 1), ("mark_submitting", 1), ("mark_submitted", 1), ("acquire", 1), ("release", 1),
           ("hold", 1), ("remaining", 1), ("drop", 1), ("lose_record", 1)]


def op_sequence(seed: int) -> list[tuple[str, tuple[Any, ...]]]:
    """A seeded list of (operation, arguments); each job is created before anything else touches it."""
    rng = random.Random(seed)
    ops: list[tuple[str, tuple[Any, ...]]] = []
    for job in JOBS:
        committed = {i: {"samples_ok": 2, "samples_failed": 0, "attempt": f"a{i}"} for i in range(rng.randrange(2))}
        ops += [("create", (job, {"kind": "embed", "output": f"/out/{job}", "queue": "gpu"}, SHARDS, committed)),
                ("load", (job, [(i, f"/in/{i}.tar", f"v{i}") for i in range(2, SHARDS)])),
                ("acquire", (f"/out/{job}", job))]
    for _ in range(STEPS):
        (name,), job, index = rng.choices(*zip(*WEIGHTS)), rng.choice(JOBS), rng.randrange(SHARDS)
        args: tuple[Any, ...] = {
            "report_done": (job, index, rng.randrange(5), rng.randrange(3)),
            "report_counted": (job, index, 2, 1, rng.random() < 0.3, rng.randrange(1000)),
            "dead_letter": (job, index, f"/in/{index}.tar", rng.choice(["boom", "x" * 3000])),
            "set_state": (job, rng.choice(list(JobState))),
            "set_progress": (job, index, rng.choice([None, 0.5])),
            "set_problem": (job, "nothing embedded"),
            "claim_finalize": (job, 30),
            "acquire": (f"/out/{job}", rng.choice(JOBS)),
            "release": (f"/out/{job}", rng.choice(JOBS)),
            "hold": (f"/out/{job}",),
            "successor": (job, index),
            "count_delivery": (job, index),
        }.get(name, (job,))
        ops.append((name, args))
    return ops + [(name, (job,)) for job in JOBS for name in ("get", "job_shards", "done_indices", "remaining")]


def counted(seed: int, before: bool) -> Counted:
    scores = [((seed * 7 + k) % 100) / 100 for k in range(3)]
    stats = {"clip_score": histogram(scores), "error_reasons": {"image (jpg) undecodable": 1}}
    return Counted([f"attempt-{seed}", 31, 0.1, 0.4, 2, 1], stats, before)


def run(client: redis.Redis) -> tuple[list[Any], dict[str, Any]]:
    """Every answer of the sequences, then the keyspace they left."""
    store, feed, leases = JobStore(client, 600, dead_letters_max=5), Feed(client, 600), OutputLeases(client, 600)
    calls: dict[str, Callable[..., Any]] = {
        "create": store.create, "load": feed.load, "acquire": leases.acquire, "release": leases.release,
        "hold": leases.hold, "report_done": store.report_done,
        "report_counted": lambda j, i, ok, bad, before, s: store.report_done(j, i, ok, bad, counted(s, before)),
        "dead_letter": store.dead_letter, "count_delivery": store.count_delivery, "set_state": store.set_state,
        "successor": feed.successor, "get": store.get, "set_progress": store.set_progress,
        "set_problem": store.set_problem, "claim_finalize": store.claim_finalize,
        "mark_submitting": store.mark_submitting, "mark_submitted": store.mark_submitted,
        "remaining": feed.remaining, "drop": feed.drop, "done_indices": store.done_indices,
        "job_shards": lambda j: _shards(store, j), "lose_record": lambda j: client.delete(keys.job(j)),
    }
    answers = []
    for seed in SEEDS:
        client.flushdb()
        answers += [(name, _answer(calls[name], args)) for name, args in op_sequence(seed)]
        answers += [("dead_letters", store.dead_letters(10)), ("list_ids", store.list_ids())]
    return answers, _keyspace(client)


def _answer(call: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """What the call returned, or the exception it raised (the same one on both, or the fake is wrong)."""
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 (compared, not hidden)
        return f"raised {type(exc).__name__}: {exc}"


def _shards(store: JobStore, job_id: str) -> Any:
    status = store.get(job_id)
    if status is None:
        return None
    return _ordered(dataclasses.asdict(store.job_shards(job_id, status)))  # not a repr: key order varies


def _ordered(value: Any) -> Any:
    """``value`` with every dict and set in sorted order (keys of any type), for comparing answers."""
    if isinstance(value, dict):
        return sorted(([repr(k), _ordered(v)] for k, v in value.items()), key=lambda kv: kv[0])
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (list, tuple)):
        return [_ordered(v) for v in value]
    return value


def _comparable(answer: Any) -> str:
    """An answer as text, floats to 12 significant digits: Redis adds HINCRBYFLOAT in long double and
    fakeredis in double, so a sum of scores can differ in its last bit (2.3218 against 2.3218000000000005),
    and fakeredis prints 0.84 as 0.83999999999999997. Nothing the code reads depends on those bits."""
    return _FLOAT.sub(lambda m: f"{float(m.group()):.12g}", json.dumps(answer, default=repr, sort_keys=True))


_FLOAT = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def _keyspace(client: redis.Redis) -> dict[str, Any]:
    read = {"string": client.get, "list": lambda k: client.lrange(k, 0, -1),
            "hash": client.hgetall,
            "set": lambda k: sorted(client.smembers(k)), "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}
    found = {}
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        found[key] = (kind, _comparable(read[kind](key)), client.pttl(key) > 0)
    return found


@pytest.fixture()
def real_redis(redis_url) -> redis.Redis:
    url = urlparse(redis_url)
    return redis.Redis.from_url(urlunparse(url._replace(path=f"/{CROSS_CHECK_DB}")), decode_responses=True)


@pytest.mark.integration
def test_the_fake_job_store_feed_and_leases_answer_as_real_redis_does(real_redis, monkeypatch):
    def frozen_clock() -> None:  # the same timestamps in both runs
        ticks = iter(range(1_700_000_000, 1_800_000_000))
        monkeypatch.setattr(jobs_module, "time", SimpleNamespace(time=lambda: float(next(ticks))))

    frozen_clock()
    fake_answers, fake_keys = run(fakes.memory_redis())
    frozen_clock()
    real_answers, real_keys = run(real_redis)
    real_redis.flushdb()

    for step, (fake, real) in enumerate(zip(fake_answers, real_answers)):
        assert _comparable(fake) == _comparable(real), f"answer {step}: {fake[0]}"
    assert len(fake_answers) == len(real_answers)
    assert fake_keys == real_keys and any(expires for _, _, expires in real_keys.values())


def test_the_stub_broker_takes_what_celery_send_task_takes():
    # the positional order of Celery's send_task, and its options by keyword
    stub = list(inspect.signature(fakes.StubBroker.send_task).parameters)[:4]
    assert stub == ["self", *list(inspect.signature(Celery.send_task).parameters)[1:4]]
    broker = fakes.StubBroker()
    broker.send_task("t", ["job", 1], queue="gpu", producer=None)
    assert broker.sent("t") == [fakes.Message("t", ["job", 1], "gpu")]
    with pytest.raises(ValueError, match="positional"):
        broker.send_task("t", [], {"x": 1})
