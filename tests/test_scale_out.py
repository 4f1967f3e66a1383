"""Horizontal scale-out with real ``clipbatch worker`` subprocesses: workers sharing one job, a
worker joining and another leaving (SIGTERM) in the middle of a job, and queue routing."""
from __future__ import annotations

import re
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
import redis

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.orchestration.embedded import private_redis
from clipbatch.core.specs import JobSpec, ModelSpec
from tests.conftest import service_env, wait_for
from tests.s3proxy import FaultyS3Proxy
from tests.test_faults import assert_exactly_once
from clipbatch.sample_data import build_collection, write_shard
from clipbatch.workers.samples import iter_raw_samples

pytestmark = pytest.mark.integration
BASE_SHARDS, SAMPLES_PER_SHARD = 2, 300
# About a second a shard here: the churn job outlasts a worker's start-up (~10 s on 2 busy cores).
RATIO_SHARDS, JOIN_LEAVE_SHARDS = 8, 48
# docs/scaling.md's per-shard costs are measured by test_redis_and_s3_requests_per_shard; these
# budgets fail it when a change adds round trips per shard.
COST_SHARDS, IDLE_WINDOW_S = (1, 6), 5.0
REDIS_COMMANDS_PER_SHARD_BUDGET, S3_REQUESTS_PER_SHARD_BUDGET = 64, 25
MERGE_COUNTERS = 24  # the job totals' counters and error-reason counts the counting script bumps besides bins
# One core per worker (torch and decoding single-threaded), so two workers can use both cores.
ONE_CORE = {"CLIPBATCH_TORCH_THREADS": "1", "CLIPBATCH_DECODE_THREADS": "1"}


def replicate(base: Path, folder: Path, shards: int) -> dict[str, int]:
    """``shards`` tars made from the base shards' samples under new keys (no re-encoding)."""
    sources = sorted(base.glob("*.tar"))
    good = corrupt = 0
    for n in range(shards):
        with open(sources[n % len(sources)], "rb") as f:
            raws = list(iter_raw_samples(f))
        write_shard(folder / f"{n:05d}.tar", [(f"{n:05d}{r.key[5:]}", r.members) for r in raws])
        corrupt += sum("bad" in r.key for r in raws)
        good += sum("bad" not in r.key for r in raws)
    return {"shards": shards, "good": good, "corrupt": corrupt}


@pytest.fixture(scope="module")
def base_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    build_collection(folder, shards=BASE_SHARDS, samples_per_shard=SAMPLES_PER_SHARD, seed=7)
    return folder


def make_job(redis_url: str, base: Path, tmp_path: Path, shards: int, checkpoint: Path, queue: str):
    folder, out = tmp_path / f"in-{queue}", tmp_path / f"out-{queue}"
    built = replicate(base, folder, shards)
    client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
    spec = JobSpec(str(folder), str(out), ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=32, queue=queue)
    return client, spec, built, out


def commits(log: str, job_id: str) -> int:
    return len(re.findall(rf"shard committed job={job_id} ", log))


def starts(log: str, job_id: str) -> int:
    return len(re.findall(rf"shard start job={job_id} ", log))


def test_two_workers_share_a_job_and_finish_sooner(redis_url, base_shards, checkpoint, tmp_path, start_worker):
    # given: the same job twice, on one worker, then on that worker and a second one
    env = service_env(redis_url, **ONE_CORE)
    queue = f"ratio-{uuid.uuid4().hex[:8]}"
    first = start_worker(queue, env)
    seconds = []
    for run, workers in enumerate(([first], [first, None])):
        if workers[-1] is None:
            workers[-1] = start_worker(queue, env)
        client, spec, built, out = make_job(redis_url, base_shards, tmp_path / f"run{run}", RATIO_SHARDS, checkpoint,
                                            queue)
        # when: the job runs to its end
        start = time.perf_counter()
        job = client.submit(spec)
        status = job.wait(timeout_s=600)
        seconds.append(time.perf_counter() - start)
        # then: it succeeded exactly once, and with two workers both took shards
        assert status["state"] == "succeeded" and status["samples_done"] == built["good"]
        taken = [commits(w.log(), job.job_id) for w in workers]
        assert sum(taken) == RATIO_SHARDS and all(n >= 1 for n in taken), taken
        assert_exactly_once(out, RATIO_SHARDS, built, label=f"{len(workers)} worker(s)")
        print(f"[scale-out] {len(workers)} worker(s): {RATIO_SHARDS} shards in {seconds[-1]:.1f}s, "
              f"shards per worker {taken}")
    print(f"[scale-out] speed-up of two workers over one: {seconds[0] / seconds[1]:.2f}x "
          f"(2 shared cores; one core per worker)")


def test_a_worker_joins_and_another_leaves_mid_job(redis_url, base_shards, checkpoint, tmp_path, start_worker):
    # given: two workers working through a job
    env = service_env(redis_url, **ONE_CORE)
    queue = f"churn-{uuid.uuid4().hex[:8]}"
    staying, leaving = start_worker(queue, env), start_worker(queue, env)
    client, spec, built, out = make_job(redis_url, base_shards, tmp_path, JOIN_LEAVE_SHARDS, checkpoint, queue)
    job = client.submit(spec)
    wait_for(lambda: commits(staying.log() + leaving.log(), job.job_id) >= 1, 120, "a first commit")

    # when: a third worker joins, then the leaving one is told to scale down (SIGTERM) in the middle of a shard
    joining = start_worker(queue, env)
    at_join = client.jobs.get(job.job_id)
    wait_for(lambda: starts(leaving.log(), job.job_id) > commits(leaving.log(), job.job_id), 120,
             "the leaving worker to be in the middle of a shard")
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(timeout=120) == 0
    status = job.wait(timeout_s=600)

    # then: the joiner took shards, the leaver finished the shard it had started, nothing was lost or doubled
    logs = [w.log() for w in (staying, leaving, joining)]
    taken = [commits(log, job.job_id) for log in logs]
    print(f"\n[scale-out] shards left when the third worker was ready: "
          f"{at_join['shards_total'] - at_join['shards_done']}; "
          f"commits staying/leaving/joining: {taken}")
    assert starts(logs[1], job.job_id) == taken[1] >= 1
    assert taken[2] >= 1 and sum(taken) == JOIN_LEAVE_SHARDS
    assert status["state"] == "succeeded"
    assert (status["shards_done"], status["samples_done"], status["samples_failed"]) == (
        JOIN_LEAVE_SHARDS, built["good"], built["corrupt"])
    assert_exactly_once(out, JOIN_LEAVE_SHARDS, built, label="join and leave")


def test_queue_routing_cpu_and_gpu_workers_take_only_their_queue(redis_url, photo_shards, checkpoint, tmp_path,
                                                                start_worker):
    # given: a CPU-only worker on queue `cpu` and a "GPU" worker on queue `gpu` (on the CPU here)
    env = service_env(redis_url)
    cpu, gpu = start_worker("cpu", env), start_worker("gpu", env)
    client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
    folder, built = photo_shards

    # when: one job is submitted to each queue
    jobs = {q: client.submit(JobSpec(str(folder), str(tmp_path / q), ModelSpec("clipbatch-tiny", str(checkpoint)),
                                     batch_size=16, queue=q)) for q in ("cpu", "gpu")}
    statuses = {q: job.wait(timeout_s=300) for q, job in jobs.items()}

    # then: each worker ran every shard of its own queue's job and none of the other's
    assert all(s["state"] == "succeeded" for s in statuses.values())
    for worker, mine, other in ((cpu, "cpu", "gpu"), (gpu, "gpu", "cpu")):
        assert commits(worker.log(), jobs[mine].job_id) == built["shards"]
        assert starts(worker.log(), jobs[other].job_id) == 0
        assert f"job={jobs[other].job_id}" not in worker.log()


def redis_counters(r: redis.Redis) -> Counter:
    """Calls per command, plus bytes in and out, of a whole Redis server."""
    counts = Counter({name.removeprefix("cmdstat_"): stats["calls"]
                      for name, stats in r.info("commandstats").items()})
    net = r.info("stats")
    counts["bytes_in"], counts["bytes_out"] = net["total_net_input_bytes"], net["total_net_output_bytes"]
    return counts


def test_redis_and_s3_requests_per_shard(s3_endpoint, bucket, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a Redis of our own (its counters count only this), S3 through a counting proxy, one worker
    folder, _ = photo_shards
    sources = sorted(folder.glob("*.tar"))
    upstream = urlparse(s3_endpoint)
    queue = f"cost-{uuid.uuid4().hex[:8]}"
    (tmp_path / "redis").mkdir()
    with private_redis(tmp_path / "redis") as url, FaultyS3Proxy((upstream.hostname, upstream.port), 0.0) as proxy:
        r = redis.Redis.from_url(url)
        worker = start_worker(queue, service_env(url, AWS_ENDPOINT_URL_S3=proxy.url))
        worker_connections = r.info("clients")["connected_clients"] - 1  # less our own
        client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": url}))
        time.sleep(IDLE_WINDOW_S)  # let the worker's start-up traffic settle
        idle_before, t0 = redis_counters(r), time.perf_counter()
        time.sleep(IDLE_WINDOW_S)
        idle = (redis_counters(r) - idle_before, time.perf_counter() - t0)
        runs = {}
        # when: a small and a large job run (the difference cancels each job's fixed costs)
        for shards in COST_SHARDS:
            for i in range(shards):
                boto3.client("s3").upload_file(str(sources[i % len(sources)]), bucket, f"cost{shards}/{i:05d}.tar")
            before, requests, t0 = redis_counters(r), proxy.requests, time.perf_counter()
            spec = JobSpec(f"s3://{bucket}/cost{shards}/", f"s3://{bucket}/out{shards}",
                           ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=16, queue=queue)
            job = client.submit(spec)
            # watched through the log, not by polling Redis (a status watcher is not a per-shard cost)
            wait_for(lambda: commits(worker.log(), job.job_id) == shards, 300, f"{shards} commits", interval_s=0.2)
            runs[shards] = (redis_counters(r) - before, proxy.requests - requests, time.perf_counter() - t0)
        # the worker that counts a job's last shard ends it, just after its commit line
        wait_for(lambda: all(client.job(j).status()["state"] == "succeeded" for j in client.jobs.list_ids(2)), 60,
                 "both jobs to end")
        last = client.job(job.job_id).status()  # the larger job's
        worker.stop()

    # then: per shard (the worker's idle loop, ~1 BRPOP a second, runs on during the extra time)
    (small, large), n = COST_SHARDS, COST_SHARDS[1] - COST_SHARDS[0]
    idle_rate = {k: v / idle[1] for k, v in idle[0].items()}
    per_shard = {k: (runs[large][0][k] - runs[small][0][k]) / n for k in set(runs[large][0]) | set(runs[small][0])}
    commands = {k: round(v, 1) for k, v in sorted(per_shard.items()) if not k.startswith("bytes") and v >= 0.05}
    # The counting script merges the shard's score histogram into the job's totals: one HINCRBY(FLOAT)
    # per non-empty bin and per counter, all inside one EVALSHA round trip; bounded by the shard's rows.
    merge = commands.pop("hincrby", 0) + commands.pop("hincrbyfloat", 0)
    rows_per_shard = (last["samples_done"] + last["samples_failed"]) / COST_SHARDS[1]
    s3_per_shard = (runs[large][1] - runs[small][1]) / n
    print(f"\n[capacity] idle worker: {sum(v for k, v in idle_rate.items() if not k.startswith('bytes')):.1f} "
          f"Redis commands/s, {idle_rate.get('bytes_in', 0) + idle_rate.get('bytes_out', 0):.0f} B/s, "
          f"{worker_connections} Redis connections; the larger job took {runs[large][2] - runs[small][2]:.1f}s more")
    print(f"[capacity] per shard: Redis {sum(commands.values()):.1f} commands {commands} (+{merge:.1f} merging "
          f"the histogram inside the counting script, {rows_per_shard:.0f} rows a shard), "
          f"{per_shard['bytes_in']:.0f} B in, {per_shard['bytes_out']:.0f} B out; S3 {s3_per_shard:.1f} requests")
    assert 0 < sum(commands.values()) <= REDIS_COMMANDS_PER_SHARD_BUDGET
    assert 0 < merge <= rows_per_shard + MERGE_COUNTERS
    assert 0 < s3_per_shard <= S3_REQUESTS_PER_SHARD_BUDGET
