"""Job records in a real Redis: counting a shard is idempotent, completion is detected once."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from clipbatch.core import keys, merged
from clipbatch.core.jobs import Counted, JobStore
from clipbatch.core.scores import histogram
from clipbatch.core.keys import DEAD_LETTERS_MAX, JobState

pytestmark = pytest.mark.integration


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


def job_key_ttls(store: JobStore, job_id: str) -> dict[str, int]:
    """Every Redis key the job owns (its hash and everything under ``clipbatch:job:<id>:``) -> its TTL."""
    names = [keys.job(job_id), *store.r.scan_iter(match=f"{keys.job(job_id)}:*")]
    return {name: store.r.ttl(name) for name in names if store.r.exists(name)}


def test_every_key_of_a_job_that_ran_expires(redis_url):
    # given: a job whose shards were delivered, counted, failed, dead-lettered and finalised
    store, job_id = new_job(redis_url, total=3)
    store.count_delivery(job_id, 0)
    stats = {"attempt": "a0", "samples_ok": 5, "samples_failed": 1, "error_reasons": {"no caption member": 1},
             "clip_score": histogram(np.linspace(0.1, 0.3, 5))}
    record = merged.shard_record({"index": 0, "attempt": "a0", "files": ["stats/0.json"], "samples_ok": 5,
                                  "samples_failed": 1}, stats)
    store.report_done(job_id, 0, 5, 1, Counted(record, stats, before=False))
    store.dead_letter(job_id, 1, "/in/1.tar", "poison")
    store.set_progress(job_id, 3, 0.5)
    store.claim_finalize(job_id, lease_s=30)

    # when: its hash is gone (expired) and a late worker still reports on it
    ttls = job_key_ttls(store, job_id)
    store.r.delete(keys.job(job_id))
    store.set_progress(job_id, 4, 0.25)
    store.report_done(job_id, 2, 5, 0)

    # then: every key it owned carried a TTL, and the late writes left no key without one
    assert {keys.job_done(job_id), keys.job_failed(job_id), keys.job_deliveries(job_id), keys.job_commits(job_id),
            keys.job_merged(job_id)} <= set(ttls)
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert all(ttl > 0 for ttl in job_key_ttls(store, job_id).values()), job_key_ttls(store, job_id)


def test_the_dead_letter_list_is_capped_newest_kept(redis_url):
    # given: a store whose dead-letter list holds at most 5 records
    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), ttl_s=60, dead_letters_max=5)
    job_id = uuid.uuid4().hex
    store.create(job_id, {"kind": "embed", "output": "/tmp/x", "queue": "q"}, 12, {})

    # when: more shards than the cap are dead-lettered
    for index in range(12):
        store.dead_letter(job_id, index, f"/in/{index}.tar", f"poison {index}")

    # then: the list never exceeds the cap and keeps the newest records
    assert store.r.llen(keys.DEAD_LETTERS) == 5
    assert [r["index"] for r in store.dead_letters(10)] == [11, 10, 9, 8, 7]


def test_the_default_dead_letter_cap_is_a_documented_constant():
    assert DEAD_LETTERS_MAX == 10_000
    assert JobStore(redis.Redis(), ttl_s=60).dead_letters_max == DEAD_LETTERS_MAX
