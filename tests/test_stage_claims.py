"""The stage engine's claim (core/stages.py), searched with the stub broker of tests/fakes.py (no worker:
it is the claim that is under test), on the in-memory Redis (the fast tier) and on the real one: a
stage's successor is launched exactly once whatever the order of its tasks' settles, duplicates and
redeliveries; a task given up on ends the job at its stage.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, given, settings, strategies as st

from clipbatch.core import keys
from clipbatch.core.jobs import JobStore
from clipbatch.core.stages import Engine, NextStage, Stage
from tests import fakes



@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def r(request):
    """A Redis: fakeredis in this process, or the real one (the claim is Lua: both run the same script)."""
    if request.param == "memory":
        return fakes.memory_redis()
    return redis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)


@dataclass(frozen=True)
class TwoStages:
    """Stage a: tasks 0..n-1; stage b: the next m tasks (its size learnt at launch); b is the last."""

    n: int
    m: int

    def stage_of(self, index: int) -> Stage:
        return Stage("a", 0, self.n) if index < self.n else Stage("b", self.n, 0, last=True)

    def next_stage(self, stage: Stage) -> NextStage | None:
        return NextStage("b", [(self.n + k, f"in#b={k}", None) for k in range(self.m)], self.m)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 5), m=st.integers(0, 4), window=st.integers(1, 4), data=st.data())
def test_a_stage_launches_its_successor_once_whatever_the_settles(r, n, m, window, data):
    # given: a job of two stages, its first stage's tasks settled in a random order with duplicates
    # (a redelivery or a duplicate message settles the same index again) and some given up on
    job = uuid.uuid4().hex[:12]
    jobs = JobStore(r, 600)
    jobs.create(job, {"kind": "shards", "output": "/x", "queue": "q"}, n, {})
    broker = fakes.StubBroker()
    engine = Engine(r, 600, broker, window)
    given_up = data.draw(st.sets(st.integers(0, n - 1), max_size=n), label="given up")
    order = data.draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=3 * n).filter(
        lambda xs: set(xs) == set(range(n))), label="settle order")

    # when: each settle runs, and every task ends by asking for its successor
    outcomes = []
    for index in order:
        outcomes.append(engine.settle(job, "shards", "q", index, TwoStages(n, m), index in given_up))
        engine.successor(job, "shards", "q", index)

    # then: the transition happened once, at the first settle that completed the stage
    status = jobs.get(job)
    first_complete = next(k for k in range(len(order)) if set(order[:k + 1]) == set(range(n)))
    assert all(o == "wait" for o in outcomes[:first_complete])
    if given_up:
        assert outcomes[first_complete] == "ended" and status["shards_total"] == n
        assert broker.messages == [] and r.llen(keys.job_pending(job)) == 0
    else:
        assert outcomes[first_complete] == "launched" and status["shards_total"] == n + m
        sent = sorted(m.args[1] for m in broker.messages)
        assert sorted(set(sent)) == sent, "a task of the next stage was published twice"
        # at least the window's worth went out (a late duplicate of a task that took no successor may take
        # one: the window grows by one, no task goes out twice), and the rest waits in the pending list
        assert len(sent) >= min(m, window) and set(sent) <= set(range(n, n + m))
        assert r.llen(keys.job_pending(job)) == m - len(sent)
    assert all(o in ("done", "launched") for o in outcomes[first_complete + 1:]) and \
        outcomes[first_complete + 1:].count("launched") == 0


def test_a_claimant_killed_before_its_launch_finishes_it_when_redelivered(r):
    # given: the task that completed stage a claimed the transition, and died before launching it
    job = uuid.uuid4().hex[:12]
    JobStore(r, 600).create(job, {"kind": "shards", "output": "/x", "queue": "q"}, 2, {})
    plan, broker = TwoStages(2, 3), fakes.StubBroker()
    engine = Engine(r, 600, broker, 2)
    assert engine.settle(job, "shards", "q", 0, plan, False) == "wait"

    class Dies(TwoStages):
        def next_stage(self, stage):
            raise KeyboardInterrupt("killed while planning the next stage")

    with pytest.raises(KeyboardInterrupt):
        engine.settle(job, "shards", "q", 1, Dies(2, 3), False)
    # when: a duplicate of another task settles (not the claimant), then the claimant is redelivered
    assert engine.settle(job, "shards", "q", 0, plan, False) == "done"
    assert engine.settle(job, "shards", "q", 1, plan, False) == "launched"
    assert engine.settle(job, "shards", "q", 1, plan, False) == "done"
    # then: the next stage went out once
    assert JobStore(r, 600).get(job)["shards_total"] == 5
    assert sorted(m.args[1] for m in broker.messages) == [2] and r.llen(keys.job_pending(job)) == 2


def test_a_resubmit_never_relaunches_a_stage_that_was_complete_in_storage(r):
    # given: a resubmitted job that starts at stage b (stage a complete in storage before it)
    job = uuid.uuid4().hex[:12]
    JobStore(r, 600).create(job, {"kind": "shards", "output": "/x", "queue": "q"}, 2, {})
    broker = fakes.StubBroker()
    engine = Engine(r, 600, broker, 2)
    engine.seed(job, Stage("b", 2, 0), [])
    # when: a duplicate of each of stage a's tasks arrives
    outcomes = [engine.settle(job, "shards", "q", i, TwoStages(2, 3), False) for i in (0, 1)]
    # then: nothing is launched
    assert outcomes == ["done", "done"] and broker.messages == [] and r.llen(keys.job_pending(job)) == 0
