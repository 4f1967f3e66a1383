"""Job states with a real worker: a shard that fails every attempt, and a cancelled job."""
from __future__ import annotations

import json
import shutil
import uuid

import pytest
import redis

from clipbatch.core.broker import EMBED_SHARD, make_app
from clipbatch.core.config import Settings
from tests.conftest import run_cli, service_env, wait_for

pytestmark = pytest.mark.integration


def submit(env, input_, output, checkpoint, queue):
    result = run_cli("submit", "embed", "--input", input_, "--output", output, "--model", "clipbatch-tiny",
                     "--pretrained", str(checkpoint), "--queue", queue, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_shard_failing_every_attempt_fails_the_job_and_names_the_shard(
    redis_url, photo_shards, checkpoint, tmp_path, start_worker
):
    # given: a job over two shards, one of which vanishes before any worker reads it
    folder, built = photo_shards
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(folder / name, inputs / name)
    queue = f"fail-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_MAX_RETRIES="1")
    job_id = submit(env, str(inputs), str(tmp_path / "out"), checkpoint, queue)
    (inputs / "00001.tar").unlink()

    # when: a worker processes the job
    start_worker(queue, env)
    watched = run_cli("status", job_id, "--watch", "--json", env=env)

    # then: the job failed with exit code 1, naming shard 1 and why; shard 0 completed
    assert watched.returncode == 1, watched.stderr
    status = json.loads(watched.stdout)
    assert status["state"] == "failed"
    assert (status["shards_done"], status["shards_failed"]) == (1, 1)
    assert "00001.tar" in status["failures"]["1"] and "FileNotFoundError" in status["failures"]["1"]
    dead = json.loads(run_cli("dead-letters", "--json", "--limit", "50", env=env).stdout)
    assert [d["index"] for d in dead if d["job_id"] == job_id] == [1]
    job_file = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job_file["state"] == "failed" and job_file["failures"] == {"1": status["failures"]["1"]}


def test_cancel_skips_queued_shards(redis_url, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a job queued with no worker yet
    folder, _ = photo_shards
    queue = f"cancel-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    job_id = submit(env, str(folder), str(tmp_path / "out"), checkpoint, queue)

    # when: it is cancelled; then a message of it that escaped the purge (a producer's late
    # duplicate, say) reaches a worker
    cancelled = run_cli("cancel", job_id, env=env)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    r = redis.Redis.from_url(redis_url)
    assert r.llen(queue) == 0  # its queued messages left the list KEDA counts
    app = make_app(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
    app.send_task(EMBED_SHARD, args=[job_id, 0, str(sorted(folder.glob("*.tar"))[0]), None], queue=queue)
    worker = start_worker(queue, env)
    wait_for(lambda: worker.log().count("reason=cancelled") == 1, 120, "the worker to skip the late message")

    # then: the state is cancelled (exit 1), and nothing was computed or committed
    status = run_cli("status", job_id, "--json", env=env)
    assert status.returncode == 1 and json.loads(status.stdout)["state"] == "cancelled"
    assert "shard start" not in worker.log()
    assert not (tmp_path / "out" / "_commits").exists()


def snapshot(folder, r, job_id):
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    record = {k: r.dump(k) for k in sorted(r.keys(f"clipbatch:job:{job_id}*"))}
    return files, record


def test_status_only_reads_and_a_worker_ends_the_job(redis_url, photo_shards, checkpoint, tmp_path, start_worker):
    # given: an output whose every shard is committed by a first job, and no worker running
    folder, _ = photo_shards
    queue = f"status-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    out = tmp_path / "out"
    worker = start_worker(queue, env)
    first = run_cli("submit", "embed", "--input", str(folder), "--output", str(out), "--model", "clipbatch-tiny",
                    "--pretrained", str(checkpoint), "--queue", queue, "--wait", "--json", env=env)
    assert json.loads(first.stdout)["state"] == "succeeded", first.stderr
    worker.stop()
    (out / "_job.json").unlink()

    # when: a second job on it has nothing to run, and its status is read again and again
    job_id = submit(env, str(folder), str(out), checkpoint, queue)
    r = redis.Redis.from_url(redis_url)
    before = snapshot(out, r, job_id)
    for _ in range(3):
        shown = run_cli("status", job_id, "--json", env=env)
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "queued", shown.stderr
        assert run_cli("jobs", "--json", env=env).returncode == 0
        assert run_cli("report", job_id, env=env).returncode == 0

    # then: status wrote nothing, to the output or to the job record, and ended nothing
    assert snapshot(out, r, job_id) == before
    assert not (out / "_job.json").exists()

    # when: a worker comes up, then it ends the job once, from the message the submit left
    start_worker(queue, env)
    watched = run_cli("status", job_id, "--watch", "--json", env=env)
    assert json.loads(watched.stdout)["state"] == "succeeded", watched.stderr
    assert json.loads((out / "_job.json").read_text())["job_id"] == job_id


def test_the_report_over_skipped_rescored_and_new_shards_is_the_full_merge(redis_url, checkpoint, tmp_path,
                                                                          start_worker):
    from clipbatch.core import merged
    from clipbatch.core.report import SUMMARY, full_totals
    from clipbatch.core.scores import summarize
    from clipbatch.core.storage import open_storage
    from tests.invariant import check_output
    from tests.test_overlap_and_reruns import shard

    # given: an output a first job ended over three shards (with error rows), and a worker
    inputs, out = tmp_path / "in", tmp_path / "out"
    keys = {name: shard(inputs, name, 4, seed, corrupt=1) for seed, name in enumerate(("a", "b", "c"))}
    queue = f"merge-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    worker = start_worker(queue, env)
    assert json.loads(run_cli("status", submit(env, str(inputs), str(out), checkpoint, queue), "--watch", "--json",
                              env=env).stdout)["state"] == "succeeded"

    # when: b changes, d is new, a and c are unchanged, and the job runs again
    keys["b"] = shard(inputs, "b", 6, 7, corrupt=2)
    keys["d"] = shard(inputs, "d", 3, 8)
    job_id = submit(env, str(inputs), str(out), checkpoint, queue)
    status = json.loads(run_cli("status", job_id, "--watch", "--json", env=env).stdout)

    # then: skipped 2, rescored 1; its end merged only its own shards, and the report is the full merge
    assert (status["state"], status["shards_skipped"], status["shards_rescored"]) == ("succeeded", 2, 1)
    assert f"job finalized job={job_id} state=succeeded incomplete=0 orphans_swept=0 merged=bounded" in worker.log()
    storage = open_storage(str(out))
    got, (_, totals) = json.loads(storage.read(SUMMARY)), full_totals(storage)
    want = summarize(merged.with_bounds(totals))
    for key in ("count", "min", "max", "quantiles", "fraction_kept", "histogram"):
        assert got[key] == want[key], key
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
    assert (got["shards"], got["embedded"], got["error_reasons"]) == (4, {"pairs": 17}, dict(totals.reasons))
    assert sum(got["error_reasons"].values()) == 4
    check_output(str(out), {str(inputs / f"{name}.tar"): k for name, k in keys.items()})
