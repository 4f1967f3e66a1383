"""Redis restarted mid-job (a Redis of the test's own): workers reconnect and the job completes;
if Redis lost everything, resubmitting from storage truth finishes it without redoing shards."""
from __future__ import annotations

import subprocess
import uuid

import pytest
import redis

from clipbatch.orchestration.client import UnknownJob
from tests.conftest import free_port, service_env, wait_for
from tests.test_faults import assert_exactly_once, big_shards, submit  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


class OwnRedis:
    """A redis-server on its own port; ``persistent`` keeps an fsync-always append-only file."""

    def __init__(self, workdir, persistent: bool) -> None:
        self.port, self.workdir, self.persistent = free_port(), workdir, persistent
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--dir", str(self.workdir), *aof], stdout=subprocess.DEVNULL)
        wait_for(self._up, 20, "redis-server to answer")

    def _up(self) -> bool:
        try:
            return redis.Redis.from_url(self.url).ping()
        except redis.ConnectionError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture()
def own_redis(tmp_path, request):
    server = OwnRedis(tmp_path, persistent=request.param)
    server.start()
    yield server
    server.stop(kill=True)


@pytest.mark.parametrize("own_redis", [True], indirect=True)
def test_redis_restart_mid_job(own_redis, big_shards, checkpoint, tmp_path, start_worker):
    # given: a job running on a persistent Redis; a shard in flight at the restart comes back
    # after the visibility timeout, so the test uses a short one
    folder, built = big_shards
    queue, out = f"rr-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    client, job_id = submit(own_redis.url, folder, out, checkpoint, queue, visibility_timeout_s=5)
    worker = start_worker(queue, service_env(own_redis.url, CLIPBATCH_VISIBILITY_TIMEOUT="5"))
    wait_for(lambda: "shard committed" in worker.log(), 120, "a first commit")

    # when: Redis restarts
    own_redis.stop()
    own_redis.start()
    status = client.job(job_id).wait(timeout_s=300)

    # then: the worker reconnected and the job completed, nothing lost or doubled
    assert status["state"] == "succeeded"
    assert (status["shards_done"], status["samples_done"]) == (3, built["good"])
    assert_exactly_once(out, 3, built)


@pytest.mark.parametrize("own_redis", [False], indirect=True)
def test_redis_state_lost_then_resubmitted_from_storage(own_redis, big_shards, checkpoint, tmp_path, start_worker):
    # given: a job running on a Redis that keeps nothing on disk
    folder, built = big_shards
    queue, out = f"rl-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    client, job_id = submit(own_redis.url, folder, out, checkpoint, queue)
    worker = start_worker(queue, service_env(own_redis.url))
    wait_for(lambda: "shard committed" in worker.log(), 120, "a first commit")

    # when: Redis dies and comes back empty, and the job is resubmitted to the same output
    own_redis.stop(kill=True)
    own_redis.start()
    with pytest.raises(UnknownJob):
        client.job(job_id).status()
    committed = len(list((out / "_commits").glob("*.json")))
    client2, job2 = submit(own_redis.url, folder, out, checkpoint, queue)
    status = client2.job(job2).wait(timeout_s=300)

    # then: only uncommitted shards ran; totals are whole; each shard committed once
    assert status["state"] == "succeeded"
    assert status["shards_skipped"] >= committed >= 1
    assert (status["shards_done"], status["samples_done"]) == (3, built["good"])
    assert worker.log().count("shard committed") == 3
    assert_exactly_once(out, 3, built)
