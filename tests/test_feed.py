"""A job's messages carry identity, not its spec, and at most a window of them sit in the broker
(core/feed.py); cancel empties the queue; a submit stopped half-way is completed by a resubmit.

Real Redis, real workers; the queue lists checked are the ones KEDA reads (LLEN of the queue).
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from clipbatch.core import feed, keys
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.orchestration import Client
from tests.conftest import run_cli, service_env
from tests.invariant import check_output
from tests.test_overlap_and_reruns import shard

pytestmark = pytest.mark.integration


def client_for(redis_url: str, **settings) -> Client:
    return Client(replace(Settings.from_env(), broker_url=redis_url, **settings))


def spec_for(inputs: Path, out: Path, checkpoint: Path, queue: str) -> JobSpec:
    return JobSpec(str(inputs), str(out), ModelSpec("clipbatch-tiny", str(checkpoint)), queue=queue)


def queued(r: redis.Redis, queue: str) -> list[dict]:
    """The messages waiting in ``queue`` (what KEDA counts), decoded: their task and arguments."""
    found = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        found.append({"task": message["headers"]["task"], "args": args, "bytes": len(raw)})
    return found


@pytest.fixture()
def world(redis_url, checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    keys = {str(inputs / f"s{i}.tar"): shard(inputs, f"s{i}", 2, seed=i) for i in range(7)}
    return inputs, out, keys, f"q-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(redis_url)


def test_a_message_carries_the_shards_identity_and_the_broker_holds_only_the_window(world, checkpoint, redis_url):
    inputs, out, keys, queue, r = world
    client = client_for(redis_url, queue_window=3)
    job = client.submit(spec_for(inputs, out, checkpoint, queue))

    messages = queued(r, queue)
    assert len(messages) == 3 and client.feed.remaining(job.job_id) == 4
    for message in messages:
        job_id, index, uri, version = message["args"]
        assert job_id == job.job_id and uri in keys and version
        assert message["bytes"] < 1_600  # a Celery envelope plus the identity; the spec is in the job's record
    assert job.status()["shards_total"] == 7
    job.cancel()


def test_a_window_smaller_than_the_job_still_runs_every_shard_exactly_once(world, checkpoint, redis_url, start_worker):
    inputs, out, keys, queue, r = world
    client = client_for(redis_url, queue_window=2)
    job = client.submit(spec_for(inputs, out, checkpoint, queue))
    assert len(r.lrange(queue, 0, -1)) == 2

    start_worker(queue, service_env(redis_url))
    status = job.wait(timeout_s=240)

    assert status["state"] == "succeeded" and status["shards_done"] == 7
    assert client.feed.remaining(job.job_id) == 0
    check_output(str(out), keys)


def test_a_redelivered_shard_publishes_the_same_successor(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    job_id = uuid.uuid4().hex[:16]
    r.hset(f"clipbatch:job:{job_id}", mapping={"state": "running"})
    r.expire(f"clipbatch:job:{job_id}", 60)
    pending = feed.Feed(r, 60)
    pending.load(job_id, [(i, f"/in/{i}.tar", f"v{i}") for i in range(5)])

    first, again = pending.successor(job_id, 0), pending.successor(job_id, 0)
    other = pending.successor(job_id, 1)

    assert first == again == (0, "/in/0.tar", "v0") and other == (1, "/in/1.tar", "v1")
    assert pending.remaining(job_id) == 3
    assert r.ttl(keys.job_fed(job_id)) > 0 and r.ttl(keys.job_pending(job_id)) > 0
    # once parent 0's successor is in the broker, a duplicate of parent 0 publishes nothing, ever
    pending.sent(job_id, 0)
    pending.sent(job_id, 0)
    assert pending.successor(job_id, 0) is None and pending.remaining(job_id) == 3
    assert pending.successor(job_id, 1) == (1, "/in/1.tar", "v1")


def test_cancel_empties_the_queue_keda_reads_and_leaves_other_jobs_messages(world, checkpoint, redis_url, tmp_path):
    inputs, out, keys, queue, r = world
    client = client_for(redis_url, queue_window=4)
    doomed = client.submit(spec_for(inputs, out, checkpoint, queue))
    kept = client.submit(spec_for(inputs, tmp_path / "other-out", checkpoint, queue))
    assert r.llen(queue) == 8

    assert doomed.cancel()

    left = queued(r, queue)
    assert r.llen(queue) == 4 and {m["args"][0] for m in left} == {kept.job_id}
    assert client.feed.remaining(doomed.job_id) == 0 and client.feed.remaining(kept.job_id) == 3
    kept.cancel()
    assert r.llen(queue) == 0


def test_a_submit_interrupted_half_way_is_cancelled_and_a_resubmit_completes_it(world, checkpoint, redis_url,
                                                                               start_worker):
    inputs, out, keys, queue, r = world
    client = client_for(redis_url, queue_window=2)

    def interrupt(done: int, total: int) -> None:
        if done > total - 2:  # the pending list is loaded and the window is being published
            raise KeyboardInterrupt

    client.progress = interrupt
    with pytest.raises(KeyboardInterrupt):
        client.submit(spec_for(inputs, out, checkpoint, queue))
    client.progress = None
    assert r.llen(queue) == 0  # what it had published was purged with its cancel

    job = client.submit(spec_for(inputs, out, checkpoint, queue))  # the lease was given back
    start_worker(queue, service_env(redis_url))
    assert job.wait(timeout_s=240)["state"] == "succeeded"
    check_output(str(out), keys)


KILLED_SUBMIT = """
import os, signal, sys
from dataclasses import replace
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.orchestration import Client
client = Client(replace(Settings.from_env(), queue_window=2))
def die(done, total):
    if done > total - 2:
        os.kill(os.getpid(), signal.SIGKILL)
client.progress = die
client.submit(JobSpec(sys.argv[1], sys.argv[2], ModelSpec("clipbatch-tiny", sys.argv[3]), queue=sys.argv[4]))
"""


def test_a_submit_killed_half_way_holds_its_output_until_stale_then_a_resubmit_completes_it(
        world, checkpoint, redis_url, start_worker):
    inputs, out, keys, queue, r = world
    env = service_env(redis_url, CLIPBATCH_SUBMIT_STALE_S="3")
    killed = subprocess.run([sys.executable, "-c", KILLED_SUBMIT, str(inputs), str(out), str(checkpoint), queue],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr

    args = ("submit", "embed", "--input", str(inputs), "--output", str(out), "--model", "clipbatch-tiny",
            "--pretrained", str(checkpoint), "--queue", queue)
    busy = run_cli(*args, env=env)
    assert busy.returncode == 2 and "in use by job" in busy.stderr and "Traceback" not in busy.stderr

    time.sleep(3.5)
    taken = run_cli(*args, env=env)
    assert taken.returncode == 0, taken.stderr
    start_worker(queue, env)
    status = json.loads(run_cli("status", taken.stdout.strip(), "--watch", "--json", env=env).stdout)
    assert status["state"] == "succeeded"
    check_output(str(out), keys)
