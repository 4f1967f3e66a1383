"""``clipbatch jobs`` lists recent jobs from the real Redis; job records expire after CLIPBATCH_JOB_TTL."""
from __future__ import annotations

import json
import re
import uuid

import pytest
import redis

from clipbatch.core import keys
from tests.conftest import run_cli, service_env

pytestmark = pytest.mark.integration

TTL_S = 1234


def test_jobs_lists_id_kind_state_progress_and_age(redis_url, photo_shards, checkpoint, tmp_path):
    # given: a job submitted to a queue no worker reads, with a short retention
    folder, built = photo_shards
    env = service_env(redis_url, CLIPBATCH_JOB_TTL=str(TTL_S))
    submitted = run_cli("submit", "embed", "--input", str(folder), "--output", str(tmp_path / "out"), "--model",
                        "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", f"idle-{uuid.uuid4().hex[:8]}",
                        env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    # when: the jobs are listed
    listed = run_cli("jobs", env=env)
    as_json = run_cli("jobs", "--json", env=env)

    # then: a header and one line per job with its id, kind, state, progress and age
    assert listed.returncode == 0 and as_json.returncode == 0, listed.stderr + as_json.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["JOB", "KIND", "STATE", "PROGRESS", "AGE", "OUTPUT"]
    line = next(li for li in lines if li.startswith(job_id))
    assert re.fullmatch(rf"{job_id}\s+embed\s+queued\s+0/{built['shards']}\s+0%\s+\d+[smhd]\s+{tmp_path / 'out'}", line)
    record = next(r for r in json.loads(as_json.stdout) if r["job_id"] == job_id)
    assert (record["kind"], record["state"], record["progress"]) == ("embed", "queued", 0.0)
    assert record["age_s"] >= 0 and record["shards_total"] == built["shards"]

    # and every Redis key of the job expires within the configured retention
    r = redis.Redis.from_url(redis_url)
    ttls = [r.ttl(k) for k in keys.job_keys(job_id) if r.exists(k)]
    assert ttls and all(0 < t <= TTL_S for t in ttls)


def test_the_job_index_forgets_jobs_whose_records_expired(redis_url):
    import time

    from clipbatch.core.jobs import JobStore

    # given: an index entry older than the retention (its record has expired) and a recent one
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    old, recent = f"old-{uuid.uuid4().hex[:8]}", f"recent-{uuid.uuid4().hex[:8]}"
    r.zadd(keys.JOBS_INDEX, {old: time.time() - 2 * TTL_S, recent: time.time() - TTL_S / 2})
    # when: a job is created
    store = JobStore(r, TTL_S)
    store.create(f"new-{uuid.uuid4().hex[:8]}", {"kind": "embed", "output": "/tmp/unused", "queue": "none"}, 1, {})
    # then: only the expired entry left the index, so --limit counts live jobs
    assert r.zscore(keys.JOBS_INDEX, old) is None and r.zscore(keys.JOBS_INDEX, recent) is not None
