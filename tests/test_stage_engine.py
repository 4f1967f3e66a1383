"""The stage engine (core/stages.py) on real jobs and real workers: a task given up on ends its job at its
stage, duplicates of finished stages relaunch nothing, and a curation job's pinned scored input is
checked (tests/test_stage_claims.py searches the claim itself). These tests use only the CLI, the
broker and storage, so they run against the code before the engine too (where they fail)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import replace

import pytest
import redis

from clipbatch.core import commit, layout
from clipbatch.core.broker import CURATE_STAGE, FINETUNE_STEP, make_app
from clipbatch.core.config import Settings
from clipbatch.core.curation import load_plan
from clipbatch.core.storage import open_storage
from clipbatch.sample_data import shape_collection
from tests.conftest import run_cli, service_env, wait_for
from tests.curation_data import plant, write_scored, write_shard
from tests.test_curation import OPTIONS, _kill_on_stage_start

pytestmark = pytest.mark.integration


def _curation_submit(scored_uri: str, out, queue: str, env: dict[str, str], wait: bool = True) -> dict:
    """Submit a curation job (the CLI exits 1 for a job that ends failed: the status is printed all the same)."""
    args = ["submit", "shards", "--scored", scored_uri, "--output", str(out), *OPTIONS, "--queue", queue, "--json"]
    result = run_cli(*args, *(["--wait"] if wait else []), env=env, timeout=600)
    assert result.returncode in (0, 1) and result.stdout, result.stderr
    return json.loads(result.stdout)


def found_done(worker, job: str) -> int:
    """Messages of ``job`` a worker found done: committed already, or its job already ended."""
    log = worker.log()
    return log.count(f"shard already_committed job={job} ") + log.count(f"shard skipped job={job} ")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return write_scored(tmp_path_factory.mktemp("engine"), plant(3_000, seed=3, boundary_share=0.3), 3)


def test_a_dead_lettered_curation_task_ends_the_job_failed_and_frees_the_output(scored, tmp_path, redis_url,
                                                                                 start_worker):
    # given: a scored output one of whose embedding files is gone (the clusters task cannot read it)
    scored_uri, _ = scored
    victim = f"{scored_uri}/{layout.embed_files(1)['img']}"
    hidden = victim + ".hidden"
    os.rename(victim, hidden)
    try:
        queue, env = f"eng-{uuid.uuid4().hex[:8]}", service_env(redis_url, CLIPBATCH_MAX_RETRIES="1")
        start_worker(queue, env)

        # when: a curation job runs on it
        status = _curation_submit(scored_uri, tmp_path / "out", queue, env)

        # then: it ended failed at the clusters stage, naming the task and its reason, with a resubmit hint
        assert status["state"] == "failed", status
        assert status["shards_total"] == 1 and list(status["failures"]) == ["0"]
        assert "img_emb" in status["failures"]["0"] or "No such file" in status["failures"]["0"]
        assert "stage clusters" in status["problem"] and "resubmit" in status["problem"]
    finally:
        os.rename(hidden, victim)
    # and: the output is free: once the file is back, a resubmit runs the job to success
    again = _curation_submit(scored_uri, tmp_path / "out", queue, env)
    assert again["state"] == "succeeded" and again["shards_done"] == again["shards_total"]


def test_duplicates_of_finished_stages_never_relaunch_work(scored, tmp_path, redis_url, start_worker):
    # given: a finished curation job
    scored_uri, _ = scored
    queue, env = f"eng-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    worker = start_worker(queue, env)
    out = tmp_path / "out"
    status = _curation_submit(scored_uri, out, queue, env)
    assert status["state"] == "succeeded"
    job = status["job_id"]
    plan = load_plan(open_storage(str(out)))
    runs_before = worker.log().count(f"job={job} ")

    # when: the last task of every stage but the write stage, and the clusters task, are delivered again
    app = make_app(replace(Settings.from_env(), broker_url=redis_url))
    sent = 0
    for stage in ("clusters", "assign", "dedup", "boundary"):
        for n in sorted({0, (plan.size(stage) or 1) - 1}) if plan.size(stage) else ():
            app.send_task(CURATE_STAGE, args=[job, plan.base(stage) + n, f"{out}#{stage}={n}", None], queue=queue)
            sent += 1
    r = redis.Redis.from_url(redis_url)
    wait_for(lambda: r.llen(queue) == 0, 120, "the duplicates to be taken")
    wait_for(lambda: found_done(worker, job) >= sent, 120, "the duplicates to run")
    time.sleep(3)  # any relaunched task would have been published and taken by now

    # then: each duplicate ran once, found its commit, and launched nothing
    assert r.llen(queue) == 0
    ran = worker.log().count(f"job={job} ") - runs_before
    assert found_done(worker, job) == sent
    assert ran == sent, f"{ran} log lines of the job for {sent} duplicates: work was relaunched"
    after = json.loads(run_cli("status", job, "--json", env=env).stdout)
    assert (after["state"], after["shards_total"]) == ("succeeded", status["shards_total"])


def test_a_rescore_of_the_scored_output_mid_job_fails_the_job_naming_the_shard(scored, tmp_path, redis_url,
                                                                                start_worker):
    # given: a curation job (on a copy of the scored output) whose worker is killed as its write stage starts
    scored_uri, _ = scored
    copy = tmp_path / "copy"
    shutil.copytree(scored_uri.rsplit("/", 1)[0], copy)
    scored_copy = str(copy / "scored")
    queue, env = f"eng-{uuid.uuid4().hex[:8]}", service_env(redis_url, CLIPBATCH_VISIBILITY_TIMEOUT="5")
    doomed = start_worker(queue, env)
    out = tmp_path / "out"
    job = _curation_submit(scored_copy, out, queue, env, wait=False)["job_id"]
    _kill_on_stage_start(doomed, "write")

    # when: a score job rescores scored shard 2 (new scores, a new commit) before the write stage runs
    planted = plant(1_000, seed=99, boundary_share=0.0)
    storage = open_storage(scored_copy)
    storage.delete(layout.marker(2))
    write_shard(copy, 2, planted.emb, planted.scores, planted.image, attempt="rescored")
    assert commit.read_marker(storage, 2)["attempt"] == "rescored"
    start_worker(queue, env)
    status = json.loads(run_cli("status", job, "--watch", "--json", env=env, timeout=600).stdout)

    # then: the job failed, naming the rescored shard, rather than writing rows nobody selected
    assert status["state"] == "failed", status
    reasons = " ".join(status["failures"].values())
    assert "scored shard 2" in reasons and "rescored" in reasons
    # and: a resubmit on the same output is refused, naming the option
    refused = run_cli("submit", "shards", "--scored", scored_copy, "--output", str(out), "--top-fraction", "0.9",
                      "--queue", queue, env=env)
    assert refused.returncode != 0 and "--scored" in refused.stderr and "Traceback" not in refused.stderr


def test_a_dead_lettered_finetune_step_ends_the_job_and_a_duplicate_step_relaunches_nothing(
        redis_url, checkpoint, tmp_path, start_worker):
    # given: a fine-tune over 3 shards whose second shard disappears after the submit
    train = tmp_path / "train"
    shape_collection(train, per_class=4, shards=3, seed=1)
    queue, env = f"eng-{uuid.uuid4().hex[:8]}", service_env(redis_url, CLIPBATCH_MAX_RETRIES="1")
    common = ["--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--epochs", "1", "--batch-size", "8",
              "--queue", queue]
    submitted = run_cli("submit", "finetune", "--train", f"{train}/{{00000..00002}}.tar", "--output",
                        str(tmp_path / "ft"), *common, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    (train / "00001.tar").rename(train / "gone.tar")
    worker = start_worker(queue, env)

    # when: the job runs
    status = json.loads(run_cli("status", job, "--watch", "--json", env=env, timeout=600).stdout)

    # then: it ended failed at step 1, without running step 2
    assert status["state"] == "failed" and list(status["failures"]) == ["1"], status
    assert "stage step1" in status["problem"]
    assert not re.search(rf"shard start job={job} shard=2 ", worker.log())

    # given: the shard is back, and a resubmit runs the job to its end
    (train / "gone.tar").rename(train / "00001.tar")
    again = run_cli("submit", "finetune", "--train", f"{train}/{{00000..00002}}.tar", "--output",
                    str(tmp_path / "ft"), *common, "--wait", "--json", env=env, timeout=600)
    done = json.loads(again.stdout)
    assert done["state"] == "succeeded" and done["shards_done"] == 3, again.stdout + again.stderr
    ran = worker.log().count(f"shard committed job={done['job_id']} ")
    # when: step 0 is delivered twice more
    app = make_app(replace(Settings.from_env(), broker_url=redis_url))
    for _ in range(2):
        app.send_task(FINETUNE_STEP, args=[done["job_id"], 0, f"{train}/00000.tar", None], queue=queue)
    wait_for(lambda: found_done(worker, done["job_id"]) >= 2, 120, "duplicates")
    time.sleep(3)
    # then: each found its commit and nothing else ran (no step relaunched, no checkpoint rewritten)
    assert found_done(worker, done["job_id"]) == 2
    assert worker.log().count(f"shard committed job={done['job_id']} ") == ran
    assert redis.Redis.from_url(redis_url).llen(queue) == 0
