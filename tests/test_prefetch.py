"""Shard prefetch (tasks/prefetch.py): while a shard's tail runs, the task takes the next message
of its queue and starts that shard's input; then runs it through the same lifecycle and acks it.

Real Redis, real ``clipbatch worker`` subprocesses; every outcome is checked from storage.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from clipbatch.core.broker import EMBED_SHARD, TRAIN_SHARD, make_app
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.orchestration import Client
from clipbatch.sample_data import build_collection
from tests.conftest import service_env, wait_for
from tests.invariant import check_output
from tests.test_faults import assert_exactly_once, child_pids
from tests.test_overlap_and_reruns import shard
from tests.test_signed_messages import make_identity, signing_env

PREFETCH_ON = {"CLIPBATCH_PREFETCH": "1"}


def client_for(redis_url: str, **settings) -> Client:
    return Client(replace(Settings.from_env(), broker_url=redis_url, **settings))


def spec_for(inputs: Path, out: Path, checkpoint: Path, queue: str, batch_size: int = 8) -> JobSpec:
    return JobSpec(str(inputs), str(out), ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=batch_size,
                   queue=queue)


def read_aheads(log: str) -> list[int]:
    """The shard indices this worker took as read-ahead, in order."""
    return [int(i) for i in re.findall(r"shard read-ahead job=\S+ shard=(\d+) ", log)]


def move_next_behind_first(r: redis.Redis, queue: str) -> None:
    """The message published last becomes the second one delivered (kombu pops from the list's right)."""
    first, last = r.rpop(queue), r.lpop(queue)
    r.rpush(queue, last)
    r.rpush(queue, first)


@pytest.fixture()
def small_world(redis_url, checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    keys = {str(inputs / f"s{i}.tar"): shard(inputs, f"s{i}", 24, seed=i) for i in range(5)}
    return inputs, out, keys, f"pf-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(redis_url)


@pytest.mark.integration
def test_every_shard_runs_exactly_once_and_read_aheads_start_warm(small_world, checkpoint, redis_url, start_worker):
    # given: a job of five shards, all in the queue, and one worker with prefetch on
    inputs, out, keys, queue, _ = small_world
    job = client_for(redis_url, queue_window=5).submit(spec_for(inputs, out, checkpoint, queue))

    # when: the worker runs it
    worker = start_worker(queue, service_env(redis_url, **PREFETCH_ON))
    status = job.wait(timeout_s=240)

    # then: every shard committed once, counted once; some ran as read-aheads with their input warm
    assert status["state"] == "succeeded" and status["shards_done"] == 5
    check_output(str(out), keys)
    log = worker.log()
    taken = read_aheads(log)
    assert taken and len(taken) == len(set(taken)), log[-3000:]
    assert log.count("shard committed") == 5
    warm = {json.loads(p.read_text())["index"] for p in (out / "stats").glob("*.json")
            if json.loads(p.read_text())["input_warm"]}
    assert warm and warm <= set(taken)


@pytest.mark.integration
def test_prefetch_off_takes_no_read_ahead(small_world, checkpoint, redis_url, start_worker):
    inputs, out, keys, queue, _ = small_world
    job = client_for(redis_url, queue_window=5).submit(spec_for(inputs, out, checkpoint, queue))
    worker = start_worker(queue, service_env(redis_url, CLIPBATCH_PREFETCH="0"))
    assert job.wait(timeout_s=240)["state"] == "succeeded"
    check_output(str(out), keys)
    assert not read_aheads(worker.log())


@pytest.mark.integration
def test_a_read_ahead_of_another_task_goes_back_and_runs_normally(small_world, checkpoint, redis_url, start_worker):
    # given: a job's shard messages, with another task's message second in line
    inputs, out, keys, queue, r = small_world
    job = client_for(redis_url, queue_window=5).submit(spec_for(inputs, out, checkpoint, queue))
    stranger = f"gone-{uuid.uuid4().hex[:8]}"
    sent = make_app(replace(Settings.from_env(), broker_url=redis_url)).send_task(
        TRAIN_SHARD, args=[stranger, 0, "nowhere.tar", None], queue=queue)
    move_next_behind_first(r, queue)

    # when: a worker with prefetch on runs the queue
    worker = start_worker(queue, service_env(redis_url, **PREFETCH_ON))
    status = job.wait(timeout_s=240)
    wait_for(lambda: f"shard skipped job={stranger}" in worker.log(), 60, "the other task to run")

    # then: the read-ahead put it back untouched, Celery ran it as that task, the job is exactly once
    log = worker.log()
    assert f"read-ahead put back id={sent.id} reason=other_task" in log
    assert re.search(rf"Task {re.escape(TRAIN_SHARD)}\[{sent.id}\] succeeded", log), log[-3000:]
    assert status["state"] == "succeeded"
    check_output(str(out), keys)


@pytest.mark.integration
def test_a_failing_read_ahead_is_requeued_and_retried_by_celery(small_world, checkpoint, redis_url, start_worker):
    # given: shard 1 (the first read-ahead) cannot put its image embeddings at their final name
    inputs, out, keys, queue, _ = small_world
    job = client_for(redis_url, queue_window=5).submit(spec_for(inputs, out, checkpoint, queue))
    blocker = out / "img_emb" / "img_emb_1.npy"
    (blocker / "in-the-way").mkdir(parents=True)

    # when: a worker with prefetch on runs the job, and the blocker goes once Celery retries the shard
    # (retries back off 1, 2, 4... s: with 6 of them the blocker is gone long before the last one)
    worker = start_worker(queue, service_env(redis_url, CLIPBATCH_MAX_RETRIES="6", **PREFETCH_ON))
    wait_for(lambda: "retry: Retry in" in worker.log(), 180, "Celery to retry the requeued shard")
    shutil.rmtree(blocker)
    status = job.wait(timeout_s=240)

    # then: the read-ahead failed and went back; Celery's own path retried it; exactly once
    log = worker.log()
    assert read_aheads(log)[0] == 1
    assert "shard read-ahead failed, requeued" in log and "IsADirectoryError" in log
    assert status["state"] == "succeeded" and status["shards_done"] == 5 and status["shards_failed"] == 0
    check_output(str(out), keys)


@pytest.mark.integration
def test_an_unsigned_message_taken_as_read_ahead_never_runs(redis_url, small_world, checkpoint, tmp_path,
                                                             start_worker):
    # given: signing on; a signed job, with an unsigned copy of its shard 1 second in line
    inputs, out, keys, queue, r = small_world
    pki = tmp_path / "pki"
    store = pki / "trusted"
    store.mkdir(parents=True)
    identity = make_identity(pki, "worker")
    (store / identity[1].name).write_bytes(identity[1].read_bytes())
    env = service_env(redis_url, **signing_env(*identity, store), **PREFETCH_ON)
    saved = {k: os.environ.get(k) for k in env if k.startswith("CLIPBATCH_SIGNING")}
    os.environ.update({k: env[k] for k in saved})
    try:
        job = client_for(redis_url, queue_window=5).submit(spec_for(inputs, out, checkpoint, queue))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    unsigned = make_app(replace(Settings.from_env(), broker_url=redis_url)).send_task(
        EMBED_SHARD, args=[job.job_id, 1], queue=queue)
    move_next_behind_first(r, queue)

    # when: a worker runs the queue
    worker = start_worker(queue, env)
    status = job.wait(timeout_s=240)
    wait_for(lambda: unsigned.id in (r.lindex("clipbatch:dead_letters", 0) or b"").decode()
             or any(unsigned.id in x.decode() for x in r.lrange("clipbatch:dead_letters", 0, 20)), 60,
             "the unsigned message to be dead-lettered")

    # then: the read-ahead refused it and put it back; Celery's consumer dead-lettered it; it never ran
    log = worker.log()
    assert f"read-ahead put back id={unsigned.id} reason=refused (ContentDisallowed)" in log, log[-3000:]
    assert unsigned.id not in " ".join(re.findall(r"shard read-ahead job=.*", log))
    assert status["state"] == "succeeded" and status["shards_done"] == 5
    assert log.count("shard start") == 5
    check_output(str(out), keys)


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Shards big enough (seconds each on this machine) that a kill lands mid-shard."""
    folder = tmp_path_factory.mktemp("big")
    return folder, build_collection(folder, shards=4, samples_per_shard=300, seed=5)


def start_big_job(redis_url, big_shards, checkpoint, tmp_path, start_worker, **env_extra):
    """A job over the big shards on its own queue, one worker with prefetch on, until a shard it took
    as read-ahead has started."""
    folder, _ = big_shards
    queue, out = f"pfkill-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = service_env(redis_url, **PREFETCH_ON, **env_extra)
    settings = {"visibility_timeout_s": int(env_extra["CLIPBATCH_VISIBILITY_TIMEOUT"])} \
        if "CLIPBATCH_VISIBILITY_TIMEOUT" in env_extra else {}
    job = client_for(redis_url, queue_window=4, **settings).submit(
        spec_for(folder, out, checkpoint, queue, batch_size=16))
    worker = start_worker(queue, env)

    def running_read_ahead() -> bool:
        log = worker.log()
        return any(re.search(rf"shard start job=\S+ shard={i} ",
                             log.split(f"shard read-ahead job={job.job_id} shard={i} ", 1)[1])
                   for i in read_aheads(log))

    wait_for(running_read_ahead, 120, "a read-ahead shard to start", interval_s=0.02)
    return job, worker, out, queue, env


@pytest.mark.integration
def test_sigkill_of_the_pool_child_during_a_read_ahead_requeues_it_at_once(redis_url, big_shards, checkpoint,
                                                                           tmp_path, start_worker):
    # given: the default visibility timeout (an hour), and a worker running a shard it took as read-ahead
    built = big_shards[1]
    job, worker, out, _, _ = start_big_job(redis_url, big_shards, checkpoint, tmp_path, start_worker)

    # when: the pool child is SIGKILLed
    for pid in child_pids(worker.proc.pid):
        os.kill(pid, signal.SIGKILL)
    status = job.wait(timeout_s=300)

    # then: the main process requeued the delivered message (Celery) and the read-ahead (ShardRequest)
    # at once, not after the visibility timeout; the job completed exactly once
    log = worker.log()
    assert "WorkerLostError" in log and re.search(r"read-ahead message \S+ of lost process \d+ requeued", log)
    assert status["state"] == "succeeded" and status["shards_done"] == 4
    assert (status["samples_done"], status["samples_failed"]) == (built["good"], built["corrupt"])
    assert_exactly_once(out, 4, built)


@pytest.mark.integration
def test_sigkill_of_the_whole_worker_during_a_read_ahead_still_completes_exactly_once(
        redis_url, big_shards, checkpoint, tmp_path, start_worker):
    # given: a short visibility timeout, and a worker running a shard it took as read-ahead
    built = big_shards[1]
    job, victim, out, queue, env = start_big_job(redis_url, big_shards, checkpoint, tmp_path, start_worker,
                                                 CLIPBATCH_VISIBILITY_TIMEOUT="5")

    # when: the machine "dies" (main process and pool child SIGKILLed), and another worker comes up
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    start_worker(queue, env)
    status = job.wait(timeout_s=300)

    # then: both messages it held came back after the visibility timeout; exactly once
    assert status["state"] == "succeeded" and status["shards_done"] == 4
    assert (status["samples_done"], status["samples_failed"]) == (built["good"], built["corrupt"])
    assert_exactly_once(out, 4, built)


# Loaded into a worker as sitecustomize (PYTHONPATH): a pool process SIGKILLs itself right after the
# first command that took a message off the test's queue returns (kombu's RPOP before it records the
# message unacked, or the one-step take), as the OOM killer could; the mark file makes it happen once.
KILL_AFTER_TAKE = """
import os, signal
import redis.client
MAIN, QUEUE, MARK = os.getpid(), os.environ["CLIPBATCH_TEST_KILL_QUEUE"], os.environ["CLIPBATCH_TEST_KILL_MARK"]
_execute = redis.client.Redis.execute_command
def _names(args):
    name = str(args[0]).upper()
    if name == "RPOP":
        return args[1:2]
    if name in ("EVAL", "EVALSHA"):
        return args[3:3 + int(args[2])]
    return ()
def execute_command(self, *args, **options):
    result = _execute(self, *args, **options)
    if result and os.getpid() != MAIN and any(str(k) == QUEUE or k == QUEUE.encode() for k in _names(args)):
        try:
            os.close(os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return result
        os.kill(os.getpid(), signal.SIGKILL)
    return result
redis.client.Redis.execute_command = execute_command
"""


@pytest.mark.integration
def test_a_pool_process_killed_right_after_taking_a_read_ahead_loses_nothing(small_world, checkpoint, redis_url,
                                                                              start_worker, tmp_path):
    # given: a job of five shards, and a worker whose pool process is SIGKILLed the instant its first
    # read-ahead leaves the queue (the default one-hour visibility timeout: nothing comes back by it)
    inputs, out, keys, queue, _ = small_world
    hook, mark = tmp_path / "hook", tmp_path / "killed"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AFTER_TAKE)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = service_env(redis_url, **PREFETCH_ON, PYTHONPATH=path, CLIPBATCH_TEST_KILL_QUEUE=queue,
                      CLIPBATCH_TEST_KILL_MARK=str(mark))
    job = client_for(redis_url, queue_window=5).submit(spec_for(inputs, out, checkpoint, queue))

    # when: the worker runs the job
    worker = start_worker(queue, env)
    status = job.wait(timeout_s=240)

    # then: the process was killed there; the main process requeued the message it had taken (recorded
    # in the same step as the take) with the one it was running, and every shard ran exactly once
    log = worker.log()
    assert mark.exists() and "WorkerLostError" in log, log[-3000:]
    assert re.search(r"read-ahead message \S+ of lost process \d+ requeued", log), log[-3000:]
    assert status["state"] == "succeeded" and status["shards_done"] == 5
    check_output(str(out), keys)


@pytest.mark.integration
def test_read_aheads_are_recorded_per_process_at_any_pool_size(redis_url):
    # given: 130 messages in a queue, and 130 pool processes of one worker (twice the old 64 slots)
    from clipbatch.tasks import held

    app = make_app(replace(Settings.from_env(), broker_url=redis_url))
    queue = f"held-{uuid.uuid4().hex[:8]}"
    sent = [app.send_task(EMBED_SHARD, args=["job", i], queue=queue).id for i in range(130)]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with app.connection_for_read() as conn:
        channel = conn.default_channel

        # when: each process takes one read-ahead
        taken = {pid: held.take(channel, queue, held.held_key("w@h", pid), 60, None) for pid in range(4000, 4130)}

        # then: each message is unacked in kombu's hash and held by exactly the process that took it
        assert r.llen(queue) == 0 and sorted(m.headers["id"] for m in taken.values()) == sorted(sent)
        for pid, message in taken.items():
            assert r.hexists("unacked", message.delivery_tag)
            assert held.held_by(r, held.held_key("w@h", pid)) == [message.delivery_tag]
            channel.qos.restore_by_tag(message.delivery_tag)  # what the main process does for a lost one
    # and: every message is back in the queue, none held twice
    assert r.llen(queue) == 130 and not r.keys("clipbatch:readahead:w@h:*")
    r.delete(queue)


class _Closes:
    def __init__(self) -> None:
        self.closed = 0

    def __exit__(self, *exc: object) -> None:
        self.closed += 1


def test_a_warm_input_goes_only_to_its_own_shard_and_any_other_is_closed(tmp_path):
    from clipbatch.core.specs import ShardSpec
    from clipbatch.workers import prefetch as ahead

    job = spec_for(tmp_path, tmp_path / "out", tmp_path / "ckpt.pt", "q")
    ours, other = ShardSpec("j", 1, "a.tar", job), ShardSpec("j", 2, "b.tar", job)
    parts = _Closes()

    def warm() -> ahead.ShardInput:
        return ahead.ShardInput(ahead.shard_key(ours), None, parts, parts)

    # given a warm input held for shard 1: shard 2 does not get it, and it is closed (reader and feeder)
    ahead.hold(warm())
    assert ahead.holding() and ahead.take(other) is None
    assert not ahead.holding() and parts.closed == 2
    # given another: shard 1 gets it, open
    ahead.hold(warm())
    taken = ahead.take(ours)
    assert taken is not None and taken.key == ("j", 1, "a.tar") and parts.closed == 2 and not ahead.holding()


def test_a_chain_takes_no_read_ahead_that_would_end_past_half_the_visibility_timeout():
    # given: a chain whose delivered shard has run for 10 s, no read-ahead taken yet
    from clipbatch.tasks.prefetch import _Chain

    chain = _Chain(task=None, queue="q", left=4, warm=lambda spec: False)
    chain.started -= 10
    # then: one more shard at that pace ends at ~30 s: taken under a 61 s timeout, not under a 59 s one
    assert chain.has_time(61) and not chain.has_time(59)
    # and: after three read-aheads the pace is 2.5 s a shard, so ~15 s is the end
    chain.taken = 3
    assert chain.has_time(31) and not chain.has_time(29)
