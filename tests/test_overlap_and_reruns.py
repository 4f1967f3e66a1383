"""Exactly-once off the happy path: overlapping jobs, other jobs' outputs, reruns that write less,
half-done commits, orphaned staging files and stores that ignore conditional writes.

Each test is a regression test for a defect issue 14 names; each checks the output from storage.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from clipbatch.core import commit, layout
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec, SpecError
from clipbatch.core.storage import open_storage
from clipbatch.orchestration import Client
from clipbatch.sample_data import find_photos, photo_sample, write_shard
from tests.conftest import run_cli, service_env
from tests.invariant import check_output
from tests.s3proxy import FaultyS3Proxy

pytestmark = pytest.mark.integration


def shard(path: Path, name: str, n: int, seed: int = 0, corrupt: int = 0) -> set[str]:
    """A tar of ``n`` real-photo samples and ``corrupt`` undecodable ones; returns its keys."""
    rng, photos = random.Random(seed), find_photos()
    samples = [(f"{name}_{i:03d}", photo_sample(photos[i % len(photos)], rng, max_side=96)) for i in range(n)]
    samples += [(f"{name}_bad{i}", {"jpg": b"<html>403</html>", "txt": b"x"}) for i in range(corrupt)]
    write_shard(path / f"{name}.tar", samples)
    return {k for k, _ in samples}


def cli(env, *args, ok=True):
    result = run_cli(*args, env=env)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def submit(env, inputs, out, checkpoint, queue, *extra, ok=True):
    return cli(env, "submit", "embed", "--input", str(inputs), "--output", str(out), "--model", "clipbatch-tiny",
               "--pretrained", str(checkpoint), "--queue", queue, *extra, ok=ok)


def wait_json(env, job_id):
    return json.loads(cli(env, "status", job_id, "--watch", "--json", ok=False).stdout)


@pytest.fixture()
def setup(redis_url, checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    return inputs, out, f"q-{uuid.uuid4().hex[:8]}", service_env(redis_url)


def uris(inputs: Path, keys: dict[str, set[str]]) -> dict[str, set[str]]:
    return {str(inputs / f"{name}.tar"): k for name, k in keys.items()}


def test_a_second_job_on_a_busy_output_is_refused_and_nothing_is_lost(setup, checkpoint, start_worker):
    # given: job 1 queued over b and c; then a arrives (it sorts first, taking b's position)
    inputs, out, queue, env = setup
    keys = {"b": shard(inputs, "b", 3, 1), "c": shard(inputs, "c", 3, 2)}
    job1 = submit(env, inputs, out, checkpoint, queue).stdout.strip()
    keys["a"] = shard(inputs, "a", 3, 3)

    # when: job 2 over a, b, c is submitted before job 1 ran
    second = submit(env, inputs, out, checkpoint, queue, ok=False)

    # then: it is refused at submit, naming the output and the job holding it
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "--output:" in second.stderr and job1 in second.stderr and "one job per output" in second.stderr

    # when: job 1 runs to its end, then job 2 is submitted again
    start_worker(queue, env)
    assert wait_json(env, job1)["state"] == "succeeded"
    job2 = submit(env, inputs, out, checkpoint, queue).stdout.strip()

    # then: every sample of a, b and c is in the output exactly once
    assert wait_json(env, job2)["state"] == "succeeded"
    check_output(str(out), uris(inputs, keys))


def test_one_output_under_two_names_takes_one_lease(setup, checkpoint, bucket, redis_url):
    # given: one local output under several names (``..``, ``file://`` with a trailing slash, a symlinked
    # folder) and one S3 output under several (a trailing slash, doubled slashes, ``..``)
    inputs, out, queue, _ = setup
    shard(inputs, "a", 1)
    (out.parent / "sub").mkdir()
    (out.parent / "link").symlink_to(out.parent)
    s3 = f"s3://{bucket}/out"
    names = {str(out): [str(out.parent / "sub" / ".." / "out"), f"file://{out}/", str(out.parent / "link" / "out")],
             s3: [f"{s3}/", f"s3://{bucket}//out", f"s3://{bucket}/x/../out"]}
    client = Client(replace(Settings.from_env(), broker_url=redis_url))

    def spec(output: str) -> JobSpec:
        return JobSpec(str(inputs), output, ModelSpec("clipbatch-tiny", str(checkpoint)), queue=queue)

    for output, others in names.items():
        # when: a job holds the output, and jobs on its other names are submitted
        holder = client.submit(spec(output))
        for other in others:
            # then: each is refused as in use by the holder (two leases would let two plans give one index
            # to two inputs)
            with pytest.raises(SpecError, match=f"in use by job {holder.job_id}"):
                client.submit(spec(other))
        assert holder.cancel()


def test_a_worker_never_counts_another_inputs_commit_as_its_own(setup, checkpoint, start_worker):
    # given: a queued job, and another plan's commit at its shard 0 (as two overlapping plans left it)
    inputs, out, queue, env = setup
    shard(inputs, "a", 2, 1)
    job = submit(env, inputs, out, checkpoint, queue).stdout.strip()
    foreign = {"index": 0, "attempt": "other", "input": "/elsewhere/z.tar", "files": [], "samples_ok": 0,
               "samples_failed": 0, "kind": "embed"}
    open_storage(str(out)).write(layout.marker(0), json.dumps(foreign).encode())

    # when: a worker runs the job
    start_worker(queue, env)
    status = wait_json(env, job)

    # then: the job fails, naming the conflict, instead of reporting a shard it never wrote
    assert status["state"] == "failed" and "IndexConflict" in status["failures"]["0"]


def test_training_shards_refuse_an_output_holding_embeddings(setup, checkpoint, start_worker):
    # given: an embed job's output
    inputs, out, queue, env = setup
    shard(inputs, "a", 3, 1)
    start_worker(queue, env)
    assert wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())["state"] == "succeeded"

    # when: training shards are submitted into that same output
    result = cli(env, "submit", "shards", "--scored", str(out), "--output", str(out), "--min-score", "-1",
                 "--queue", queue, ok=False)

    # then: refused at submit, naming --output, and no sizes.json names tars that do not exist
    assert result.returncode == 2 and "--output:" in result.stderr and "Traceback" not in result.stderr
    assert not (out / layout.SIZES).exists()


def test_a_rerun_that_writes_less_leaves_no_stale_files(setup, checkpoint, start_worker):
    # given: a committed shard with embeddings
    inputs, out, queue, env = setup
    shard(inputs, "a", 3, 1)
    start_worker(queue, env)
    assert wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())["state"] == "succeeded"
    assert (out / "img_emb" / "img_emb_0.npy").exists()

    # when: the input changes so that every sample is now an error, and the job is rerun
    keys = {"a": shard(inputs, "a", 0, 1, corrupt=3)}
    rerun = wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())
    assert rerun["state"] == "failed" and "0 of 3 embedded" in rerun["problem"]  # it embedded nothing

    # then: the old embeddings and metadata are gone; the errors file holds the new samples
    assert not (out / "img_emb" / "img_emb_0.npy").exists() and not (out / "metadata" / "metadata_0.parquet").exists()
    check_output(str(out), uris(inputs, keys))


def test_a_half_done_commit_is_finished_by_a_resubmit_and_missing_files_fail_the_job(setup, checkpoint,
                                                                                      start_worker):
    # given: a finished output, then one shard's move into place undone (its files back in its staged bundle)
    inputs, out, queue, env = setup
    keys = {"a": shard(inputs, "a", 3, 1), "b": shard(inputs, "b", 3, 2)}
    start_worker(queue, env)
    assert wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())["state"] == "succeeded"
    storage = open_storage(str(out))
    marker = commit.read_marker(storage, 1)
    storage.write(layout.bundle(marker["attempt"]), commit.pack({name: storage.read(name) for name in marker["files"]}))
    for name in marker["files"]:
        storage.delete(name)

    # when: the job is resubmitted (as after Redis lost its state)
    status = wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())

    # then: the move was finished and the output is complete
    assert status["state"] == "succeeded"
    check_output(str(out), uris(inputs, keys))

    # when: a committed shard's stats file is lost outright, and the job resubmitted
    storage.delete(layout.stats(0))
    status = wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())

    # then: the job does not report success over an incomplete output
    assert status["state"] == "failed"
    assert "files are missing" in json.loads((out / layout.JOB_FILE).read_text())["failures"]["0"]


def test_orphaned_staging_files_are_swept_when_a_job_ends(setup, checkpoint, start_worker):
    # given: staging files of a killed attempt, older than the visibility timeout, and a fresh one
    inputs, out, queue, env = setup
    env = {**env, "CLIPBATCH_VISIBILITY_TIMEOUT": "60"}
    keys = {"a": shard(inputs, "a", 2, 1)}
    old, fresh = out / "_tmp" / "killed" / "img_emb" / "img_emb_0.npy", out / "_tmp" / "running" / "stats" / "0.json"
    for path in (old, fresh):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))

    # when: a job on the output ends
    start_worker(queue, env)
    assert wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())["state"] == "succeeded"

    # then: the old orphan is gone; the young one (perhaps a live attempt) stays
    assert not old.exists() and fresh.exists()
    shutil.rmtree(out / "_tmp")
    check_output(str(out), uris(inputs, keys))


def test_a_store_that_ignores_conditional_writes_is_refused_at_submit(redis_url, s3_endpoint, bucket, checkpoint,
                                                                     tmp_path):
    # given: an S3 endpoint that drops If-None-Match (as some S3-compatible stores do)
    inputs = tmp_path / "in"
    shard(inputs, "a", 1, 1)
    upstream = urlparse(s3_endpoint)
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0, drop_headers=("if-none-match",)) as proxy:
        env = service_env(redis_url, AWS_ENDPOINT_URL_S3=proxy.url)

        # when: a job is submitted with an output there
        result = submit(env, inputs, f"s3://{bucket}/out", checkpoint, "q-unused", ok=False)

    # then: refused, naming --output and why
    assert result.returncode == 2 and "--output:" in result.stderr and "conditional writes" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stale_attempts_commit_is_never_counted_and_a_resubmit_replaces_it(setup, redis_url, checkpoint,
                                                                              start_worker):
    # given: a queued job, then a commit of an older version of its input at its index (an attempt of
    # a job whose Redis record was lost, committing after this job's plan superseded it)
    inputs, out, queue, env = setup
    keys = {"a": shard(inputs, "a", 2, 1)}
    job = submit(env, inputs, out, checkpoint, queue).stdout.strip()
    spec = json.loads(redis.Redis.from_url(redis_url).hget(f"clipbatch:job:{job}", "spec"))
    stale = {"index": 0, "attempt": "stale", "input": str(inputs / "a.tar"), "input_etag": "an-old-version",
             "input_size": 1, "files": [], "samples_ok": 0, "samples_failed": 0, "kind": "embed",
             "fingerprint": spec["fingerprint"], "model": spec["model"]}
    open_storage(str(out)).write(layout.marker(0), json.dumps(stale).encode())

    # when: a worker runs the job
    start_worker(queue, env)
    status = wait_json(env, job)

    # then: the job fails naming the stale version, instead of counting samples it never wrote
    assert status["state"] == "failed" and "an-old-version" in status["failures"]["0"]

    # when: it is resubmitted
    again = wait_json(env, submit(env, inputs, out, checkpoint, queue).stdout.strip())

    # then: the plan superseded the stale commit and the output holds the input as it is
    assert again["state"] == "succeeded"
    check_output(str(out), uris(inputs, keys))
