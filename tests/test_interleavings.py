"""A seeded search for counter-examples to the guarantee (docs/reliability.md, "The invariant").

Each seed drives a random interleaving of submits (overlapping ones included), new and changed
input shards, duplicate deliveries, worker SIGKILLs, cancels and Redis state loss against the
real Redis, an S3 server and real worker subprocesses, with tiny shards; then lets every job end,
resubmits until a job succeeds, and checks the invariant from storage alone. Every seed runs twice:
on moto and on SeaweedFS (a real S3 server, whose conditional puts the commit protocol relies on).

``CLIPBATCH_INTERLEAVING_SEEDS`` (default 3) and ``_STEPS`` (default 10) size the search; ``make soak``
runs 40 seeds of 14 steps (on both servers; ``-k moto`` or ``-k seaweedfs`` picks one).
A failure names its seed and its operations: rerun it with ``CLIPBATCH_INTERLEAVING_FIRST_SEED``.
"""
from __future__ import annotations

import io
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable

import boto3
import pytest
import redis

from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec, SpecError
from clipbatch.orchestration.client import Client, UnknownJob
from clipbatch.sample_data import find_photos, photo_sample
from clipbatch.workers.writers import write_tar
from tests.conftest import S3_SERVERS, service_env
from tests.invariant import check_output

pytestmark = pytest.mark.integration

SEEDS = int(os.environ.get("CLIPBATCH_INTERLEAVING_SEEDS", "3"))
FIRST_SEED = int(os.environ.get("CLIPBATCH_INTERLEAVING_FIRST_SEED", "0"))
STEPS = int(os.environ.get("CLIPBATCH_INTERLEAVING_STEPS", "10"))
VISIBILITY_TIMEOUT_S = 4  # a killed worker's message comes back quickly; slow shards run twice at once
OPERATIONS = ("submit", "submit", "add", "change", "kill", "cancel", "lose_redis", "pause")


@dataclass
class World:
    """What the test knows and did: the inputs' keys, the jobs, the workers, a log of operations."""

    rng: random.Random
    bucket: str
    redis_url: str
    queue: str
    inputs: dict[str, set[str]] = field(default_factory=dict)  # input URI -> its sample keys
    jobs: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    tally: dict[str, int] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return f"s3://{self.bucket}/out"

    def count(self, what: str, n: int = 1) -> None:
        self.tally[what] = self.tally.get(what, 0) + n


def client(world: World) -> Client:
    """A fresh client (fresh queue declarations, as after Redis loses its state) that sometimes
    publishes a message twice: duplicate deliveries, as a producer retry or a broker can cause."""
    # A window of 1 or 2 messages makes most shards arrive as successors from the job's pending
    # list (core/feed.py), published by workers that may be killed or lose Redis meanwhile.
    settings = replace(Settings.from_env(), broker_url=world.redis_url, visibility_timeout_s=VISIBILITY_TIMEOUT_S,
                       queue_window=world.rng.choice([1, 2, 1000]))
    c = Client(settings)
    send = c.app.send_task

    def sometimes_twice(*args, **kwargs):
        send(*args, **kwargs)
        if world.rng.random() < 0.3:
            world.count("duplicates")
            send(*args, **kwargs)

    c.app.send_task = sometimes_twice
    return c


def put_shard(world: World, name: str) -> None:
    """Upload a tar of 1-4 real-photo samples, sometimes with a corrupt one, under a fresh set of keys."""
    photos, tag = find_photos(), uuid.uuid4().hex[:6]
    samples = [(f"{name}_{tag}_{i}", photo_sample(world.rng.choice(photos), world.rng, max_side=64))
               for i in range(world.rng.randint(1, 4))]
    if world.rng.random() < 0.4:
        samples.append((f"{name}_{tag}_bad", {"jpg": b"not an image", "txt": b"broken"}))
    buf = io.BytesIO()
    write_tar(buf, samples)
    boto3.client("s3").put_object(Bucket=world.bucket, Key=f"in/{name}.tar", Body=buf.getvalue())
    world.inputs[f"s3://{world.bucket}/in/{name}.tar"] = {k for k, _ in samples}
    world.count("samples", len(samples))


def submit(world: World, checkpoint) -> str | None:
    spec = JobSpec(f"s3://{world.bucket}/in/", world.output, ModelSpec("clipbatch-tiny", str(checkpoint)),
                   batch_size=4, queue=world.queue)
    try:
        job = client(world).submit(spec)
    except SpecError as exc:
        assert "one job per output" in str(exc), exc
        world.count("refused_busy")
        return None
    world.jobs.append(job.job_id)
    return job.job_id


def step(world: World, op: str, checkpoint, workers: list, start_worker, env) -> None:
    if op == "submit":
        world.log.append(f"submit -> {submit(world, checkpoint)}")
    elif op == "add":
        name = f"s{len(world.inputs):03d}"
        put_shard(world, name)
        world.log.append(f"add {name}")
    elif op == "change":
        name = world.rng.choice(sorted(world.inputs)).rsplit("/", 1)[1].removesuffix(".tar")
        put_shard(world, name)
        world.log.append(f"change {name}")
    else:
        fault(world, op, lambda: client(world), workers, start_worker, env)


def fault(world, op: str, client_of: Callable[[], Client], workers: list, start_worker, env) -> None:
    """The faults every interleaving search injects: SIGKILL a worker (and start another), cancel the
    newest job, Redis losing its state; any other ``op`` is a pause."""
    if op == "kill":
        victim = workers.pop(world.rng.randrange(len(workers)))
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        workers.append(start_worker(world.queue, env))
        world.count("kills")
        world.log.append("kill a worker, start another")
    elif op == "cancel" and world.jobs:
        try:
            client_of().job(world.jobs[-1]).cancel()
            world.count("cancels")
            world.log.append(f"cancel {world.jobs[-1]}")
        except UnknownJob:
            world.log.append("cancel: job unknown")
    elif op == "lose_redis":
        redis.Redis.from_url(world.redis_url).flushdb()
        world.count("redis_losses")
        world.log.append("Redis loses its state")
    else:
        time.sleep(world.rng.uniform(0.5, 3))
        world.log.append("pause")


def settle(world: World, checkpoint, timeout_s: float = 240) -> dict:
    """Let every job end, then resubmit until a job on the output succeeds; returns its status."""
    deadline = time.monotonic() + timeout_s
    c = client(world)
    while time.monotonic() < deadline:
        job_id = submit(world, checkpoint)
        if job_id is None:  # the output's lease holder is still going
            time.sleep(1)
            continue
        status = c.job(job_id).wait(timeout_s=max(1.0, deadline - time.monotonic()))
        world.log.append(f"settle {job_id}: {status['state']}")
        if status["state"] == "succeeded":
            return status
    raise AssertionError(f"no job succeeded within {timeout_s}s")


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
def test_any_interleaving_keeps_every_sample_exactly_once(seed, redis_url, s3_endpoint, bucket, checkpoint,
                                                          start_worker, request):
    # given: two real workers, an input of two tiny shards, and a seeded sequence of operations
    base, _, db = redis_url.rpartition("/")
    own_redis = f"{base}/{int(db) + 3 + seed % 2}"  # flushed by lose_redis: not the suite's database
    redis.Redis.from_url(own_redis).flushdb()
    world = World(random.Random(seed), bucket, own_redis, f"il-{seed}-{uuid.uuid4().hex[:6]}")
    env = service_env(own_redis, CLIPBATCH_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S))
    workers = [start_worker(world.queue, env) for _ in range(2)]
    for name in ("s000", "s001"):
        put_shard(world, name)

    # when: the operations run, then every job is let end and the output is resubmitted to success
    ops = [world.rng.choice(OPERATIONS) for _ in range(STEPS)]
    try:
        for op in ops:
            step(world, op, checkpoint, workers, start_worker, env)
        settle(world, checkpoint)
        # then: every input sample is in the output exactly once, from storage alone
        counts = check_output(world.output, world.inputs)
    except AssertionError as exc:
        server = request.node.callspec.params["s3_endpoint"]
        raise AssertionError(f"seed {seed} on {server} (rerun: CLIPBATCH_INTERLEAVING_FIRST_SEED={seed} "
                             f"CLIPBATCH_INTERLEAVING_SEEDS=1, -k {server}): {exc}\noperations: {world.log}") from None
    print(f"\n[interleaving seed {seed}] {counts}, {world.tally}, jobs {len(world.jobs)}: {world.log}")
