"""Job records in a real Redis: counting a shard is idempotent, completion is detected once."""
from __future__ import annotations

import uuid

import redis

from clipbatch.core.jobs import JobStore
from clipbatch.core.keys import JobState


def new_job(redis_url: str, total: int = 3, committed: dict | None = None) -> tuple[JobStore, str]:
    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), ttl_s=60)
    job_id = uuid.uuid4().hex
    spec = {"kind": "embed", "output": "/tmp/x", "queue": "q"}
    store.create(job_id, spec, total, committed or {})
    return store, job_id


def test_reporting_a_shard_twice_counts_it_once(redis_url):
    store, job_id = new_job(redis_url)
    assert store.report_done(job_id, 0, 10, 1) is False
    assert store.report_done(job_id, 0, 10, 1) is False
    status = store.get(job_id)
    assert (status["shards_done"], status["samples_done"], status["samples_failed"]) == (1, 10, 1)


def test_completion_with_a_failed_shard_that_later_succeeds(redis_url):
    store, job_id = new_job(redis_url, total=2)
    store.report_done(job_id, 0, 5, 0)
    assert store.dead_letter(job_id, 1, "/in/1.tar", "boom") is True
    assert store.get(job_id)["failures"] == {1: "boom"}
    assert store.report_done(job_id, 1, 5, 0) is True  # a redelivery succeeded after all
    status = store.get(job_id)
    assert (status["shards_done"], status["shards_failed"], status["failures"]) == (2, 0, {})
    assert store.dead_letter(job_id, 1, "/in/1.tar", "late failure") is True
    assert store.get(job_id)["shards_failed"] == 0


def test_committed_shards_count_at_creation_and_states_only_move_forward(redis_url):
    store, job_id = new_job(redis_url, total=2, committed={0: {"samples_ok": 7, "samples_failed": 2}})
    status = store.get(job_id)
    assert (status["shards_done"], status["shards_skipped"], status["samples_done"]) == (1, 1, 7)
    assert store.report_done(job_id, 0, 7, 2) is False
    assert store.set_state(job_id, JobState.RUNNING)
    assert store.set_state(job_id, JobState.CANCELLED)
    assert not store.set_state(job_id, JobState.SUCCEEDED)
    assert store.get(job_id)["state"] == "cancelled"
    assert store.report_done("no-such-job", 0, 1, 0) is False


def test_dead_letters_are_listed_newest_first(redis_url):
    store, job_id = new_job(redis_url, total=1)
    assert store.count_delivery(job_id, 0) == 1 and store.count_delivery(job_id, 0) == 2
    assert store.dead_letter(job_id, 0, "/in/0.tar", "poison") is True
    newest = store.dead_letters(1)[0]
    assert (newest["job_id"], newest["index"], newest["reason"]) == (job_id, 0, "poison")
    assert store.get(job_id)["failures"] == {0: "poison"}
