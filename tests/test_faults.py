"""Faults injected for real: killed workers and pool children, scale-down, poison shards,
visibility-timeout duplicates and cancellation, with real ``clipbatch worker`` subprocesses."""
from __future__ import annotations

import json
import os
import re
import signal
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipbatch.core import layout
from clipbatch.core.storage import open_storage
from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from tests.conftest import service_env, wait_for
from tests.s3proxy import FaultyS3Proxy
from clipbatch.sample_data import build_collection

pytestmark = pytest.mark.integration
SAMPLES_PER_SHARD = 300
LONG_SAMPLES_PER_SHARD = 4000


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Shards big enough (seconds each on this machine) that a fault lands mid-shard."""
    folder = tmp_path_factory.mktemp("big")
    return folder, build_collection(folder, shards=3, samples_per_shard=SAMPLES_PER_SHARD, seed=3)


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Shards that outlast a 1 s visibility timeout with room to spare: 4,000 samples, about 5 s of work
    each for a worker with one decode thread on this machine (1,500 samples on two threads took 0.95 s
    on a quiet machine, and then no shard was ever redelivered)."""
    folder = tmp_path_factory.mktemp("long")
    return folder, build_collection(folder, shards=3, samples_per_shard=LONG_SAMPLES_PER_SHARD, seed=4)


def child_pids(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def submit(redis_url: str, inputs: Path, out: Path, checkpoint: Path, queue: str, **settings) -> tuple[Client, str]:
    client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url, **settings}))
    spec = JobSpec(str(inputs), str(out), ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=16, queue=queue)
    return client, client.submit(spec).job_id


def assert_exactly_once(out: Path, shards: int, built: dict[str, int], label: str = "") -> None:
    """One marker per shard, its files in place, row counts equal to the input's, no key twice."""
    markers = sorted((out / "_commits").glob("*.json"))
    assert len(markers) == shards
    rows = 0
    keys: list[str] = []
    for path in markers:
        marker = json.loads(path.read_text())
        i = marker["index"]
        assert all((out / f).is_file() for f in marker["files"])
        assert json.loads((out / f"stats/{i}.json").read_text())["attempt"] == marker["attempt"]
        n = len(np.load(out / f"img_emb/img_emb_{i}.npy"))
        meta = pq.read_table(out / f"metadata/metadata_{i}.parquet")
        assert n == meta.num_rows == marker["samples_ok"]
        keys += meta.column("key").to_pylist() + pq.read_table(out / f"errors/errors_{i}.parquet").column("key").to_pylist()
        rows += n
    duplicates = len(keys) - len(set(keys))
    print(f"\n[{label or out.parent.name}] samples in {built['good'] + built['corrupt']}, embedded {rows}, "
          f"error rows {len(keys) - rows}, duplicate keys {duplicates}")
    assert rows == built["good"] and duplicates == 0
    assert not (out / "_tmp").exists()


def started_job(name, redis_url, big_shards, checkpoint, tmp_path, start_worker, wait_first=True, **env_extra):
    """Submit a job over the big shards on its own queue, start a worker, wait for its first shard."""
    queue, out = f"{name}-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = service_env(redis_url, **env_extra)
    settings = {"visibility_timeout_s": int(env_extra["CLIPBATCH_VISIBILITY_TIMEOUT"])} \
        if "CLIPBATCH_VISIBILITY_TIMEOUT" in env_extra else {}
    client, job_id = submit(redis_url, big_shards[0], out, checkpoint, queue, **settings)
    worker = start_worker(queue, env)
    if wait_first:
        wait_for(lambda: "shard start" in worker.log(), 60, "the first shard to start")
    return client, job_id, worker, out, queue, env


def starts(log: str, index: int) -> int:
    return len(re.findall(rf"shard start job=\S+ shard={index} ", log))


def test_sigkill_of_worker_main_process_mid_shard(redis_url, big_shards, checkpoint, tmp_path, start_worker):
    # given: a short visibility timeout and a worker in the middle of a shard
    built = big_shards[1]
    client, job_id, victim, out, queue, env = started_job("kill", redis_url, big_shards, checkpoint, tmp_path,
                                                          start_worker, CLIPBATCH_VISIBILITY_TIMEOUT="5")

    # when: the machine "dies" (main process and pool child SIGKILLed), and another worker comes up
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    rescuer = start_worker(queue, env)
    status = client.job(job_id).wait(timeout_s=300)

    # then: the shard was redelivered and completed; everything exactly once
    assert status["state"] == "succeeded"
    assert (status["shards_done"], status["samples_done"], status["samples_failed"]) == (3, built["good"], built["corrupt"])
    assert "shard committed" not in victim.log()
    assert rescuer.log().count("shard committed") == 3
    assert_exactly_once(out, 3, built)


def test_sigkill_of_pool_child_requeues_the_message(redis_url, big_shards, checkpoint, tmp_path, start_worker):
    # given: a worker whose pool child is in the middle of a shard
    built = big_shards[1]
    client, job_id, worker, out, _, _ = started_job("child", redis_url, big_shards, checkpoint, tmp_path, start_worker)
    first = int(re.search(r"shard start job=\S+ shard=(\d+)", worker.log()).group(1))

    # when: the pool child is SIGKILLed
    for pid in child_pids(worker.proc.pid):
        os.kill(pid, signal.SIGKILL)
    status = client.job(job_id).wait(timeout_s=300)

    # then: the message went back to the queue and the same worker completed it
    assert status["state"] == "succeeded" and status["samples_done"] == built["good"]
    assert starts(worker.log(), first) == 2
    assert "WorkerLostError" in worker.log()
    assert_exactly_once(out, 3, built)


def test_visibility_timeout_duplicate_is_harmless(redis_url, long_shards, checkpoint, tmp_path, start_worker):
    # given: a visibility timeout shorter than one shard, and two workers
    folder, built = long_shards
    queue, out = f"vt-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = service_env(redis_url, CLIPBATCH_VISIBILITY_TIMEOUT="1", CLIPBATCH_DECODE_THREADS="1",
                      CLIPBATCH_TORCH_THREADS="1")
    workers = [start_worker(queue, env), start_worker(queue, env)]

    # when: a job runs, so running shards are redelivered to the other worker while still in progress
    client, job_id = submit(redis_url, folder, out, checkpoint, queue, visibility_timeout_s=1)
    status = client.job(job_id).wait(timeout_s=300)
    for worker in workers:  # a duplicate may still be running: warm shutdown lets it finish and clean up
        worker.stop()
    logs = lambda: "".join(w.log() for w in workers)  # noqa: E731

    # then: duplicates ran, yet one commit per shard won and the counters equal the input
    assert status["state"] == "succeeded"
    assert (status["shards_done"], status["samples_done"]) == (3, built["good"])
    assert logs().count("shard start") > 3
    assert logs().count("shard committed") == 3
    assert_exactly_once(out, 3, built)


def test_poison_shard_is_dead_lettered(redis_url, big_shards, checkpoint, tmp_path, start_worker):
    # given: shard 1 kills its worker process every time it runs (we SIGKILL the pool child)
    folder, built = big_shards
    queue, out = f"poison-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = service_env(redis_url, CLIPBATCH_MAX_DELIVERIES="2")
    client, job_id = submit(redis_url, folder, out, checkpoint, queue, max_deliveries=2)
    worker = start_worker(queue, env)
    killed = 0

    def kill_poison_runs() -> bool:
        nonlocal killed
        if starts(worker.log(), 1) > killed:
            for pid in child_pids(worker.proc.pid):
                os.kill(pid, signal.SIGKILL)
            killed += 1
        return client.job(job_id).status()["state"] in ("succeeded", "failed")

    # when: the job runs to its end
    wait_for(kill_poison_runs, 300, "the job to end", interval_s=0.05)
    status = client.job(job_id).status()

    # then: after two deliveries the shard is dead-lettered, the job failed naming it, the rest completed
    assert status["state"] == "failed" and killed == 2
    assert (status["shards_done"], status["shards_failed"]) == (2, 1)
    assert "poison shard" in status["failures"][1]
    dead = [d for d in client.jobs.dead_letters(20) if d["job_id"] == job_id]
    assert len(dead) == 1 and dead[0]["index"] == 1 and dead[0]["input"].endswith("00001.tar")
    assert not (out / "_commits" / "00001.json").exists() and (out / "_commits" / "00000.json").exists()


def test_sigterm_finishes_the_running_shard_and_loses_nothing(redis_url, big_shards, checkpoint, tmp_path, start_worker):
    # given: a worker in the middle of the first of three shards
    built = big_shards[1]
    client, job_id, leaving, out, queue, env = started_job("term", redis_url, big_shards, checkpoint, tmp_path,
                                                           start_worker)

    # when: it is told to scale down (SIGTERM), and a new worker is added later
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(timeout=120) == 0
    joining = start_worker(queue, env)
    status = client.job(job_id).wait(timeout_s=300)

    # then: the leaving worker finished its shard (warm shutdown); the rest ran on the new one
    assert leaving.log().count("shard committed") == 1
    assert joining.log().count("shard committed") == 2
    assert status["state"] == "succeeded" and status["samples_done"] == built["good"]
    assert_exactly_once(out, 3, built)


def test_cancel_a_running_job(redis_url, big_shards, checkpoint, tmp_path, start_worker):
    # given: a running job
    client, job_id, worker, out, queue, _ = started_job("cancel", redis_url, big_shards, checkpoint, tmp_path,
                                                        start_worker)

    # when: it is cancelled mid-shard
    assert client.job(job_id).cancel()
    wait_for(lambda: worker.log().count("reason=cancelled") == 1, 120, "the running shard to drop its work")

    # then: state cancelled; its queued messages left the broker's list (what KEDA counts) and
    # never ran; the running shard, cancelled before its commit, dropped its work (its output's
    # lease is free for the next job: it must not commit)
    assert client.job(job_id).status()["state"] == "cancelled"
    assert client.redis.llen(queue) == 0
    assert worker.log().count("shard start") == 1 and worker.log().count("shard dropped") == 1
    assert not list((out / "_commits").glob("*.json")) and not (out / "_tmp").exists()


def test_a_cancel_while_the_bundle_uploads_commits_nothing_and_leaves_nothing(
        redis_url, s3_endpoint, bucket, checkpoint, tmp_path, start_worker):
    # given: an S3 output behind a proxy that cancels the job the moment a worker's staged bundle has
    # landed, before the worker hears back: after every check that precedes the upload
    inputs, out, queue = tmp_path / "in", f"s3://{bucket}/out", f"upload-{uuid.uuid4().hex[:8]}"
    build_collection(inputs, shards=1, samples_per_shard=4, seed=5)
    client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
    job, bundles = {}, []

    def cancel_once_staged(kind: str, path: str) -> None:
        if kind == "PUT" and path.endswith("/_bundle.tar") and not bundles:
            bundles.append(path)
            assert client.job(job["id"]).cancel()

    upstream = urlparse(s3_endpoint)
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0, on_landed=cancel_once_staged) as proxy:
        spec = JobSpec(str(inputs), out, ModelSpec("clipbatch-tiny", str(checkpoint)), queue=queue)
        job["id"] = client.submit(spec).job_id
        worker = start_worker(queue, service_env(redis_url, AWS_ENDPOINT_URL_S3=proxy.url))

        # when: the worker runs the shard, and the job is cancelled between its upload and its marker
        wait_for(lambda: re.search(r"shard (dropped|committed) ", worker.log()), 180, "the shard's outcome")

    # then: the shard dropped its work: no marker, no file in place, and its staged bundle deleted by itself
    storage = open_storage(out)
    assert bundles and "shard dropped" in worker.log() and "reason=cancelled" in worker.log()
    assert storage.list(layout.MARKER_DIR + "/") == [] and storage.list(layout.TMP_DIR + "/") == []
    assert not [name for name in layout.embed_files(0).values() if storage.exists(name)]
    assert client.job(job["id"]).status()["state"] == "cancelled"
