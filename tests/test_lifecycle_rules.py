"""The rules of a shard's life cycle (tasks/lifecycle.py), with no service: the real ``run_shard``,
``finalize`` and commit protocol over a local folder, the in-memory job store and the stub broker of
tests/fakes.py, and the synthetic compute of tests/synthetic.py in place of the model.

The same rules hold through real workers, Redis and S3 in the integration tests (tests/test_faults.py,
tests/test_feed.py, tests/test_job_lifecycle.py); here each one is a few milliseconds.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from clipbatch.core import commit, layout
from clipbatch.core.broker import EMBED_SHARD, FINALIZE_JOB
from clipbatch.core.keys import JobState
from clipbatch.core.results import ShardResult
from clipbatch.core.specs import ShardSpec
from clipbatch.core.storage import open_storage
from clipbatch.tasks import lifecycle
from clipbatch.tasks.finalize import finalize
from tests import fakes, synthetic


@dataclasses.dataclass
class Job:
    """An embed job of ``n`` synthetic input tars, recorded in the in-memory store, none run yet."""

    stubs: fakes.Stubs
    job_id: str
    shards: list[ShardSpec]
    output: Path

    def run(self, index: int, compute: Any = synthetic.compute) -> dict[str, Any]:
        return lifecycle.run_shard(self.shards[index], compute)

    def status(self) -> dict[str, Any]:
        status = self.stubs.jobs.get(self.job_id)
        assert status is not None
        return status

    def markers(self) -> dict[int, dict[str, Any]]:
        return commit.list_markers(open_storage(str(self.output)))


@pytest.fixture()
def make_job(tmp_path, monkeypatch):
    stubs = fakes.install(monkeypatch)

    def make(n: int, window: int | None = None) -> Job:
        folder = tmp_path / uuid.uuid4().hex[:8]
        inputs = synthetic.add_inputs(str(folder / "in"), 0, n)
        spec = synthetic.job_spec(str(folder / "in"), str(folder / "out"))
        job_id = uuid.uuid4().hex[:16]
        stubs.jobs.create(job_id, spec.to_dict(), n, {})
        shards = [ShardSpec(job_id, i, uri, spec, etag) for i, (uri, _, etag) in sorted(inputs.items())]
        if window is not None:  # as the producer submits: the rest waits in the job's pending list
            stubs.feed.load(job_id, [(s.index, s.input, s.input_etag) for s in shards[window:]])
        return Job(stubs, job_id, shards, folder / "out")

    return make


def test_a_duplicate_delivery_is_counted_exactly_once(make_job):
    # given: a job of two shards, shard 0 committed and counted
    job = make_job(2)
    assert job.run(0)["outcome"] == "committed"

    # when: its message is delivered again, and again after the job's last shard ended it
    again = job.run(0)
    assert job.run(1)["outcome"] == "committed"
    late = job.run(0)

    # then: the redelivery found the commit, the late one found the job ended (neither ran the shard), and
    # the counters hold each shard once
    assert (again["outcome"], late["outcome"]) == ("already_committed", "job_ended")
    status = job.status()
    assert (status["shards_done"], status["samples_done"], status["state"]) == (2, 2 * synthetic.SAMPLES, "succeeded")
    assert json.loads((job.output / layout.JOB_FILE).read_text())["state"] == "succeeded"


def test_an_attempt_that_loses_the_race_counts_the_winner_once(make_job):
    # given: a shard whose message is delivered a second time while the first attempt computes (in a job
    # of two shards, so the duplicate's commit does not end the job)
    job = make_job(2)
    inner: list[dict[str, Any]] = []

    def slow_compute(shard: ShardSpec, attempt: str) -> ShardResult:
        if not inner:
            inner.append(job.run(0))  # the duplicate runs to its end first
        return synthetic.compute(shard, attempt)

    # when: the first attempt commits after the duplicate did
    outer = job.run(0, slow_compute)

    # then: the duplicate won, the first attempt lost, and the shard is counted once, as the winner
    assert inner[0]["outcome"] == "committed" and outer["outcome"] == "lost_race"
    assert outer["committed_attempt"] == inner[0]["attempt"] == job.markers()[0]["attempt"]
    assert (job.status()["shards_done"], job.status()["samples_done"]) == (1, synthetic.SAMPLES)


def test_a_shard_of_a_job_cancelled_while_it_computes_does_not_commit(make_job):
    # given: a job cancelled while its shard computes
    job = make_job(2)

    def cancelled_meanwhile(shard: ShardSpec, attempt: str) -> ShardResult:
        job.stubs.jobs.set_state(job.job_id, JobState.CANCELLED)
        return synthetic.compute(shard, attempt)

    # when: the shard's compute returns
    outcome = job.run(0, cancelled_meanwhile)

    # then: the attempt is dropped: no marker, nothing counted, and a later delivery does not run it
    assert outcome == {"outcome": "cancelled"}
    assert job.markers() == {} and job.status()["shards_done"] == 0
    assert job.run(1) == {"outcome": "cancelled"} and job.markers() == {}


def test_a_shard_whose_job_redis_lost_does_not_commit(make_job):
    job = make_job(1)

    def record_lost_meanwhile(shard: ShardSpec, attempt: str) -> ShardResult:
        job.stubs.jobs.r.flushdb()
        return synthetic.compute(shard, attempt)

    assert job.run(0, record_lost_meanwhile) == {"outcome": "job_unknown"}
    assert job.markers() == {}


def test_a_poison_shard_is_dead_lettered_and_the_job_ends_failed(make_job, monkeypatch):
    # given: at most 2 starts of a shard; shard 0 of two committed, shard 1's worker lost twice
    monkeypatch.setattr(lifecycle, "SETTINGS", dataclasses.replace(lifecycle.SETTINGS, max_deliveries=2))
    job = make_job(2)
    job.run(0)

    def worker_lost(shard: ShardSpec, attempt: str) -> ShardResult:
        raise SystemExit("the worker process died")

    for _ in range(2):
        with pytest.raises(SystemExit):
            job.run(1, worker_lost)

    # when: shard 1 is delivered a third time
    outcome = job.run(1)

    # then: it is given up on, and its job's end goes out as one message
    assert outcome["outcome"] == "dead_lettered" and "poison shard" in outcome["reason"]
    assert [m.args for m in job.stubs.broker.sent(FINALIZE_JOB)] == [[job.job_id]]
    assert job.stubs.jobs.dead_letters()[0]["index"] == 1

    # and when that message runs, the job ends failed, naming the shard, with every other shard's output
    ended = finalize(job.stubs.jobs, job.job_id)
    assert ended is not None and ended["state"] == "failed" and "poison shard" in ended["failures"][1]
    assert set(job.markers()) == {0}
    assert json.loads((job.output / layout.JOB_FILE).read_text())["state"] == "failed"


def test_a_successor_is_published_once_per_parent(make_job):
    # given: a job of four shards whose queue window is two: shards 2 and 3 wait in its pending list
    job = make_job(4, window=2)
    published = job.stubs.broker.sent

    # when: shard 0 ends, and its message is delivered again
    job.run(0)
    job.run(0)

    # then: the first delivery published shard 2; the second, finding it sent, nothing (never shard 3)
    expected = [[job.job_id, i, job.shards[i].input, job.shards[i].input_etag] for i in (2, 3)]
    assert [m.args for m in published(EMBED_SHARD)] == [expected[0]]
    assert job.stubs.feed.remaining(job.job_id) == 1

    # and shard 1 takes the last entry; shards 2 and 3 find the list empty
    for i in (1, 2, 3):
        job.run(i)
    assert [m.args for m in published(EMBED_SHARD)] == expected
    assert all(m.queue == job.shards[0].job.queue for m in published(EMBED_SHARD))
    assert job.status()["state"] == "succeeded" and published(FINALIZE_JOB) == []
