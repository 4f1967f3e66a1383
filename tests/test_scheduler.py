"""The scheduler (Celery beat) submits each dataset's score job at its cron time."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import uuid

import pytest

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from tests.conftest import CLIPBATCH, run_cli, service_env, wait_for


def schedule_file(path, folder, output, cron: str, checkpoint) -> None:
    path.write_text(f"""
[[dataset]]
name = "nightly-test"
input = "{folder}"
output = "{output}"
model = "clipbatch-tiny"
pretrained = "{checkpoint}"
cron = "{cron}"
queue = "sched-{uuid.uuid4().hex[:6]}"
embeddings = false
""")


@pytest.mark.integration
def test_scheduler_submits_at_the_scheduled_minute(redis_url, photo_shards, checkpoint, tmp_path):
    # given: a schedule whose cron time is the next minute (or the one after, if that is too close)
    folder, _ = photo_shards
    now = dt.datetime.now(dt.timezone.utc)
    due = (now + dt.timedelta(minutes=2 if now.second > 45 else 1)).replace(second=0, microsecond=0)
    output = tmp_path / "scores"
    config = tmp_path / "schedule.toml"
    schedule_file(config, folder, output, f"{due.minute} {due.hour} * * *", checkpoint)
    client = Client(Settings(redis_url, 3600, 2, 3600))

    # when: the scheduler runs until its time has passed
    log = open(tmp_path / "scheduler.log", "wb")
    proc = subprocess.Popen([CLIPBATCH, "scheduler", "--config", str(config), "--state-dir", str(tmp_path / "beat")],
                            env=service_env(redis_url), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def submitted() -> bool:
            return any(j["output"] == str(output) for j in client.list_jobs(50))

        wait_for(submitted, (due - now).total_seconds() + 60, "the scheduled submission", interval_s=0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()

    # then: one score job was submitted, at (not before) the scheduled minute
    jobs = [j for j in client.list_jobs(50) if j["output"] == str(output)]
    assert len(jobs) == 1 and jobs[0]["kind"] == "score"
    assert jobs[0]["created_at"] >= due.timestamp()
    assert "scheduled job submitted dataset=nightly-test" in (tmp_path / "scheduler.log").read_text()


@pytest.mark.integration
def test_a_bad_schedule_is_refused_naming_dataset_and_field(redis_url, tmp_path, photo_shards, checkpoint):
    folder, _ = photo_shards
    config = tmp_path / "bad.toml"
    schedule_file(config, folder, tmp_path / "o", "61 25 * * *", checkpoint)
    result = run_cli("scheduler", "--config", str(config), env=service_env(redis_url))
    assert result.returncode == 2 and "nightly-test" in result.stderr and "cron" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_schedule_takes_the_input_format_options(tmp_path):
    from clipbatch.orchestration.schedule_file import ScheduleError, dataset_spec, load_schedule

    entry = ('[[dataset]]\nname = "pq"\ninput = "s3://b/x.parquet"\noutput = "s3://b/o"\nmodel = "ViT-B-32"\n'
             'cron = "0 2 * * *"\ninput_format = "{fmt}"\nimage_col = "jpg"\nsamples_per_shard = 5000\n')
    (tmp_path / "ok.toml").write_text(entry.format(fmt="parquet"))
    spec = dataset_spec(load_schedule(tmp_path / "ok.toml")[0])
    assert (spec.input_format, spec.image_col, spec.samples_per_shard, spec.kind) == ("parquet", "jpg", 5000, "score")
    (tmp_path / "bad.toml").write_text(entry.format(fmt="xls"))
    with pytest.raises(ScheduleError, match="dataset pq.*input.format"):
        load_schedule(tmp_path / "bad.toml")
