"""Progress where no one watches a terminal: ``--wait``, ``status --watch`` and ``run`` print plain lines
(shards, samples, rate, ETA) when stderr is not a TTY, and still draw the bar when it is one.

The CLI runs as a subprocess here, so its stderr is a pipe: what CI logs and ``kubectl logs`` see.
"""
from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import uuid

import pytest

from tests.conftest import CLIPBATCH, free_port, run_cli, service_env
from clipbatch.orchestration.progress import PlainLines, line_every_s

LINE = re.compile(
    r"^\[(\d+):(\d\d):(\d\d)\] job (\S+) (queued|submitting|running|succeeded|failed): shards (\d+)/(\d+)(?: \(\d+%\))?"
    r"(?:, \d+ failed)?, samples (\d+) \((\d+) bad\), ([\d.]+) samples/s, ETA (\S+)$")
BAR_GLYPHS = ("━", "…", "\x1b[")


def progress_lines(stderr: str) -> list[re.Match]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m]


def check_plain(stderr: str, job_id: str, shards: int) -> list[re.Match]:
    """Every stderr line is plain text; the progress lines count up to the job's end."""
    assert not any(g in stderr for g in BAR_GLYPHS), stderr
    lines = progress_lines(stderr)
    assert len(lines) >= 2, stderr  # one when the watch starts, one when the job ends
    assert all(m.group(4) == job_id and int(m.group(7)) == shards for m in lines), stderr
    done = [int(m.group(6)) for m in lines]
    assert done == sorted(done) and done[-1] == shards, stderr
    last = lines[-1]
    assert last.group(5) == "succeeded" and last.group(11) == "0:00:00", stderr
    return lines


@pytest.mark.integration
def test_submit_wait_prints_plain_lines_to_a_pipe(redis_url, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a real worker, and a CLI whose stderr is a pipe, asked for a line every 0.3 s
    folder, built = photo_shards
    queue = f"lines-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_PROGRESS_EVERY_S="0.3")
    start_worker(queue, env)

    # when
    result = run_cli("submit", "embed", "--input", str(folder), "--output", str(tmp_path / "out"),
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--batch-size", "8",
                     "--queue", queue, "--wait", env=env)

    # then: the submit's line, then progress lines that end at 3/3, and the status on stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"submitting: {built['shards']}/{built['shards']} shards enqueued" in result.stderr.splitlines()
    job_id = re.search(r"job (\S+) \(embed\): succeeded", result.stdout).group(1)
    lines = check_plain(result.stderr, job_id, built["shards"])
    assert int(lines[-1].group(8)) == built["good"] and int(lines[-1].group(9)) == built["corrupt"]

    # and: status --watch of the ended job prints one line, then the status
    watched = run_cli("status", job_id, "--watch", env=env)
    assert watched.returncode == 0, watched.stderr
    assert len(progress_lines(watched.stderr)) == 1 and "succeeded" in watched.stdout

    # and: on a terminal the same command draws rich's bar, not plain lines
    tty = watch_on_a_terminal(job_id, env)
    assert "━" in tty and not progress_lines(tty.replace("\r", "\n")), tty


def watch_on_a_terminal(job_id: str, env: dict[str, str]) -> str:
    """``status JOB --watch`` with stderr on a pseudo-terminal; what the terminal showed."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([CLIPBATCH, "status", job_id, "--watch"], env=env, stdout=subprocess.PIPE,
                              stderr=slave, timeout=60)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
        assert proc.returncode == 0
        return out.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.integration
def test_run_prints_plain_lines(photo_shards, checkpoint, tmp_path):
    # given: no shared Redis (run starts its own), stderr a pipe
    folder, built = photo_shards
    env = service_env(f"redis://127.0.0.1:{free_port()}/0", CLIPBATCH_CACHE_DIR=str(tmp_path / "cache"),
                      CLIPBATCH_PROGRESS_EVERY_S="0.3")

    # when
    result = run_cli("run", "embed", "--input", str(folder), "--output", str(tmp_path / "out"),
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--batch-size", "8", env=env)

    # then
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"job (\S+) \(embed\): succeeded", result.stdout).group(1)
    check_plain(result.stderr, job_id, built["shards"])


@pytest.mark.integration
def test_json_output_prints_no_progress(redis_url, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a job waited for with --json (a machine reads stdout; stderr stays quiet)
    folder, _ = photo_shards
    queue = f"lines-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_PROGRESS_EVERY_S="0.3")
    start_worker(queue, env)

    # when
    result = run_cli("submit", "embed", "--input", str(folder), "--output", str(tmp_path / "out"),
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--wait",
                     "--json", env=env)

    # then
    assert result.returncode == 0 and json.loads(result.stdout)["state"] == "succeeded", result.stderr
    assert not progress_lines(result.stderr) and "submitting" not in result.stderr


def status(done: int, total: int, samples: int, state: str = "running") -> dict:
    return {"job_id": "j1", "state": state, "shards_done": done, "shards_failed": 0, "shards_total": total,
            "samples_done": samples, "samples_failed": 0}


def test_a_line_says_rate_and_eta_from_what_the_watch_saw():
    # given: a watch that saw 2 of 10 shards (100 samples) finish in 20 s
    lines = PlainLines(io.StringIO(), every_s=5)
    lines.first = status(1, 10, 50)

    # when
    line = lines.line(status(3, 10, 150), elapsed=20.0)

    # then: 5 samples/s, and 7 shards left at 10 s each
    assert line == ("[0:00:20] job j1 running: shards 3/10 (30%), samples 150 (0 bad), 5.0 samples/s, "
                    "ETA 0:01:10")
    assert LINE.match(line)
    # and before any shard finished while watching, the ETA is unknown, not a guess
    assert lines.line(status(1, 10, 50), elapsed=3.0).endswith("0.0 samples/s, ETA unknown")


def test_lines_come_every_few_seconds_not_every_poll():
    # given: a watch with a line every hour
    stream = io.StringIO()
    lines = PlainLines(stream, every_s=3600)

    # when: it polls three times, the last at the job's end
    lines.update(status(0, 4, 0))
    lines.update(status(1, 4, 10))
    lines.update(status(4, 4, 40, state="succeeded"), force=True)

    # then: the first line and the end's, nothing between
    shown = stream.getvalue().splitlines()
    assert len(shown) == 2 and "shards 0/4" in shown[0] and "succeeded: shards 4/4" in shown[1]


@pytest.mark.parametrize("raw", ["0", "-2", "soon", "inf"])
def test_a_bad_interval_is_named_and_the_default_used(raw, monkeypatch, capsys):
    monkeypatch.setenv("CLIPBATCH_PROGRESS_EVERY_S", raw)
    assert line_every_s() == 5.0
    assert f"CLIPBATCH_PROGRESS_EVERY_S={raw!r} is not a positive number" in capsys.readouterr().err
