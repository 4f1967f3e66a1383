"""Real services for the tests: the machine's Redis, moto's S3 server on loopback, and real
``clipbatch worker`` subprocesses."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import boto3
import pytest
import redis

REDIS_URL = os.environ.get("CLIPBATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
BIN = Path(sys.executable).parent
CLIPBATCH = str(BIN / "clipbatch")
WORKER_READY_TIMEOUT_S = 120
# The fixtures that start or reach a service: a test using one must be marked ``integration``, so
# ``pytest -m "not integration"`` (``make test-fast``) needs no Redis, S3 or worker process.
SERVICE_FIXTURES = frozenset({"redis_url", "s3_endpoint", "bucket", "start_worker"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_pings(url: str) -> bool:
    """Whether a Redis answers at ``url`` (for waiting on a redis-server a test started)."""
    try:
        return redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        return False


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def require_integration(node: pytest.Item, used: set[str]) -> None:
    """Fail an unmarked test that asks for a service, naming the fixture, before the service starts."""
    if used and node.get_closest_marker("integration") is None:
        pytest.fail(f"{node.nodeid} uses {', '.join(sorted(used))}: mark it integration "
                    "(pytestmark = pytest.mark.integration, or @pytest.mark.integration)", pytrace=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    require_integration(item, SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())))


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"tests need a Redis at {REDIS_URL} (.ci/run starts one): {exc}")
    client.flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """moto in server mode on a loopback port, in its own process; boto3 env points at it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 30, "moto server")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def bucket(request) -> str:
    require_integration(request.node, {"bucket"})  # also when asked for by name (getfixturevalue)
    request.getfixturevalue("s3_endpoint")
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny model from a seeded random state, saved as a real checkpoint file."""
    from clipbatch.workers.models import save_seeded_checkpoint

    return save_seeded_checkpoint("clipbatch-tiny", tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Three shards of real photos, each with one corrupt sample."""
    from clipbatch.sample_data import build_collection

    folder = tmp_path_factory.mktemp("shards")
    return folder, build_collection(folder, shards=3, samples_per_shard=20, seed=1)


def service_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "CLIPBATCH_BROKER_URL": redis_url, **extra}
    env.setdefault("CLIPBATCH_TORCH_THREADS", "1")
    env.setdefault("CLIPBATCH_DECODE_THREADS", "2")
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CLIPBATCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


class Worker:
    """A real ``clipbatch worker`` subprocess and its log."""

    def __init__(self, queue: str, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [CLIPBATCH, "worker", "--queues", queue, "--device", "cpu", "--hostname", f"{name}@%h"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, WORKER_READY_TIMEOUT_S, "celery worker ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture()
def start_worker(request, tmp_path) -> Iterator[Callable[..., Worker]]:
    require_integration(request.node, {"start_worker"})
    started: list[Worker] = []

    def start(queue: str, env: dict[str, str], wait: bool = True) -> Worker:
        worker = Worker(queue, env, tmp_path / f"worker{len(started)}.log", f"w{len(started)}-{uuid.uuid4().hex[:6]}")
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
