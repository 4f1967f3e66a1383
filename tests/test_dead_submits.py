"""A submit killed after its job record is written, before every message is out, leaves a job that
would never end and hold its output: the workers' sweep (core/submits.py) ends it ``failed`` with a
problem line once its producer's heartbeat lapsed, frees the output, and a resubmit completes it.

Real Redis, real producer subprocesses killed with SIGKILL, real workers.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import redis

from clipbatch.core import keys
from clipbatch.core.jobs import JobStore
from clipbatch.core.leases import OutputLeases, key_for
from tests.conftest import run_cli, service_env, wait_for
from tests.invariant import check_output
from tests.test_overlap_and_reruns import shard
from tests.test_feed import client_for, spec_for

STALE_S = 2

# A producer that SIGKILLs itself at one point of its submit: right after the job record is written
# ("record": before it could mark anything else), or once the pending list is loaded, before the
# window's messages go out ("pending": nothing in the broker, nothing to feed the rest).
KILLED_SUBMIT = """
import os, signal, sys
from dataclasses import replace
from clipbatch.core.config import Settings
from clipbatch.core.jobs import JobStore
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.orchestration import Client
def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[5] == "record":
    create = JobStore.create
    JobStore.create = lambda self, *a, **k: (create(self, *a, **k), die())
client = Client(replace(Settings.from_env(), queue_window=2))
if sys.argv[5] == "pending":
    client.progress = die
client.submit(JobSpec(sys.argv[1], sys.argv[2], ModelSpec("clipbatch-tiny", sys.argv[3]), queue=sys.argv[4]))
"""


@pytest.fixture()
def world(redis_url, checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    built = {str(inputs / f"s{i}.tar"): shard(inputs, f"s{i}", 2, seed=i) for i in range(5)}
    return inputs, out, built, f"dead-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.mark.integration
@pytest.mark.parametrize("at", ["record", "pending"])
def test_a_submit_killed_after_its_record_is_ended_failed_by_the_workers_and_a_resubmit_completes(
        world, checkpoint, redis_url, start_worker, at):
    # given: a producer killed right after writing its job record, or after loading its pending list
    inputs, out, built, queue, r = world
    env = service_env(redis_url, CLIPBATCH_SUBMIT_STALE_S=str(STALE_S))
    killed = subprocess.run([sys.executable, "-c", KILLED_SUBMIT, str(inputs), str(out), str(checkpoint), queue, at],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    job_id = max(r.zrange(keys.JOBS_INDEX, 0, -1, withscores=True), key=lambda kv: kv[1])[0]
    assert r.hget(keys.job(job_id), "output") == str(out) and r.llen(queue) == 0

    # when: a worker runs (no submit on that output comes to check its holder)
    worker = start_worker(queue, env)
    wait_for(lambda: r.hget(keys.job(job_id), "state") != "queued", 60, "the workers' sweep to end the job")

    # then: the job ended failed, saying why and what to do; its output is free; nothing of it is left
    status = client_for(redis_url).job(job_id).status()
    assert status["state"] == "failed", status
    assert "submit died" in status["problem"] and "resubmit" in status["problem"]
    assert r.get(key_for(str(out))) is None and r.zscore(keys.SUBMITTING, job_id) is None
    assert r.llen(f"clipbatch:job:{job_id}:pending") == 0
    assert f"job failed: its submit died job={job_id}" in worker.log()
    shown = run_cli("status", job_id, env=env)
    assert "problem the submit died" in shown.stdout, shown.stdout + shown.stderr

    # and: a resubmit on the same output completes it, every shard exactly once
    job = client_for(redis_url, queue_window=2).submit(spec_for(inputs, out, checkpoint, queue))
    assert job.wait(timeout_s=240)["state"] == "succeeded"
    check_output(str(out), built)


@pytest.mark.integration
def test_a_live_producer_keeps_its_job_past_the_stale_interval_and_a_dead_one_loses_it(redis_url):
    # given: a job record as a submit writes it, with a short stale interval, and the output's lease
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    jobs = JobStore(r, 3600, submit_stale_s=1)
    job_id, output = f"live-{uuid.uuid4().hex[:8]}", f"/tmp/out-{uuid.uuid4().hex[:8]}"
    assert OutputLeases(r, 3600).acquire(output, job_id) is None
    jobs.create(job_id, {"kind": "embed", "output": output, "queue": "none"}, 3, {})
    from clipbatch.core import submits

    # when: its producer keeps beating past the stale interval
    for _ in range(5):
        time.sleep(0.5)
        jobs.mark_submitting(job_id)
        assert job_id not in submits.sweep(jobs, 1)
    # then: the job is untouched
    assert r.hget(keys.job(job_id), "state") == "queued" and r.get(key_for(output)) == job_id

    # when: the producer stops beating (killed), past the interval
    time.sleep(1.5)
    # then: one sweep ends it failed and frees its output, and a second finds nothing to do
    assert submits.sweep(jobs, 1) == [job_id]
    assert jobs.get(job_id)["state"] == "failed" and r.get(key_for(output)) is None
    assert job_id not in submits.sweep(jobs, 1) and r.zscore(keys.SUBMITTING, job_id) is None


@pytest.mark.integration
def test_a_whole_submit_leaves_nothing_for_the_sweep(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    jobs = JobStore(r, 3600, submit_stale_s=1)
    job_id = f"whole-{uuid.uuid4().hex[:8]}"
    jobs.create(job_id, {"kind": "embed", "output": "/tmp/unused", "queue": "none"}, 1, {})
    jobs.mark_submitted(job_id)
    time.sleep(1.5)
    from clipbatch.core import submits

    assert job_id not in submits.sweep(jobs, 1) and jobs.get(job_id)["state"] == "queued"
    assert r.hget(keys.job(job_id), "submitting") is None and not r.exists(keys.job_producer(job_id))


@pytest.mark.integration
def test_the_next_submit_on_the_output_ends_a_holder_killed_right_after_its_record(world, checkpoint, redis_url):
    # given: a producer killed right after writing its job record (no worker runs)
    inputs, out, _, queue, r = world
    env = service_env(redis_url, CLIPBATCH_SUBMIT_STALE_S=str(STALE_S))
    killed = subprocess.run([sys.executable, "-c", KILLED_SUBMIT, str(inputs), str(out), str(checkpoint), queue,
                             "record"], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    holder = r.get(key_for(str(out)))

    # when: a submit on the same output comes after the stale interval
    time.sleep(STALE_S + 0.5)
    args = ("submit", "embed", "--input", str(inputs), "--output", str(out), "--model", "clipbatch-tiny",
            "--pretrained", str(checkpoint), "--queue", queue)
    taken = run_cli(*args, env=env)

    # then: it takes the output over; the holder ended failed, saying its submit died
    assert taken.returncode == 0, taken.stderr
    assert r.hget(keys.job(holder), "state") == "failed" and "submit died" in r.hget(keys.job(holder), "problem")
    assert run_cli("cancel", taken.stdout.strip(), env=env).returncode == 0
