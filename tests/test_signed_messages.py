"""Signed messages (opt-in): with CLIPBATCH_SIGNING_* set, a job's signed messages run on a real
worker, while a message injected straight into the queue unsigned, or signed by a key the worker
does not trust, is refused, dead-lettered and never run. Cancel removes a job's signed messages
from the queue."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from clipbatch.core import feed
from clipbatch.core.broker import EMBED_SHARD, make_app
from clipbatch.core.config import Settings
from tests.conftest import run_cli, service_env, wait_for

pytestmark = pytest.mark.integration


def make_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """An RSA key and a self-signed certificate for ``name`` (Celery's auth serializer signs with RSA)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def signing_env(key: Path, cert: Path, store: Path) -> dict[str, str]:
    return {"CLIPBATCH_SIGNING_KEY": str(key), "CLIPBATCH_SIGNING_CERT": str(cert),
            "CLIPBATCH_SIGNING_CERT_STORE": str(store)}


SEND_SIGNED = """
import sys
from clipbatch.core.broker import EMBED_SHARD, make_app
make_app().send_task(EMBED_SHARD, args=[sys.argv[1], 0], queue=sys.argv[2])
"""


def test_only_messages_signed_by_a_trusted_key_run(redis_url, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a producer and a worker identity, both trusted; an intruder whose certificate is not
    pki = tmp_path / "pki"
    store = pki / "trusted"
    store.mkdir(parents=True)
    producer, worker_id = make_identity(pki, "producer"), make_identity(pki, "worker")
    intruder = make_identity(pki, "intruder")
    for _, cert in (producer, worker_id):
        (store / cert.name).write_bytes(cert.read_bytes())
    queue = f"signed-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queue, service_env(redis_url, **signing_env(*worker_id, store)))
    producer_env = service_env(redis_url, **signing_env(*producer, store))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    dead_before = r.llen("clipbatch:dead_letters")

    # when: a job is submitted with signing on
    folder, _ = photo_shards
    result = run_cli("submit", "embed", "--input", str(folder / "00000.tar"), "--output", str(tmp_path / "out"),
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--wait",
                     "--json", env=producer_env)

    # then: its signed messages ran
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded"
    starts = worker.log().count("shard start")

    # when: an unsigned message and one signed by the untrusted key go straight into the queue
    make_app(Settings(redis_url, 3600, 2, 3600)).send_task(EMBED_SHARD, args=[status["job_id"], 0], queue=queue)
    subprocess.run([sys.executable, "-c", SEND_SIGNED, status["job_id"], queue], check=True, timeout=120,
                   env=service_env(redis_url, **signing_env(*intruder, pki / "intruder.pem")))

    # then: both are dead-lettered with their reason, neither ran, and the job is untouched
    def refused() -> list[dict]:
        records = [json.loads(x) for x in r.lrange("clipbatch:dead_letters", 0, r.llen("clipbatch:dead_letters") - dead_before - 1)]
        return [d for d in records if d["reason"].startswith("message refused, not run")]

    wait_for(lambda: len(refused()) >= 2, 60, "both messages to be dead-lettered")
    reasons = " ".join(d["reason"] for d in refused())
    assert "ContentDisallowed: Refusing to deserialize untrusted content of type json" in reasons, reasons
    assert "SecurityError(\"Unknown certificate: b'intruder" in reasons, reasons
    assert worker.log().count("shard start") == starts
    again = json.loads(run_cli("status", status["job_id"], "--json", env=producer_env).stdout)
    assert (again["state"], again["shards_done"], again["shards_failed"]) == ("succeeded", status["shards_done"], 0)


def test_partial_signing_settings_are_refused(monkeypatch):
    from clipbatch.core.signing import Signing

    monkeypatch.setenv("CLIPBATCH_SIGNING_KEY", "/k.pem")
    with pytest.raises(ValueError, match="CLIPBATCH_SIGNING_CERT, CLIPBATCH_SIGNING_CERT_STORE"):
        Signing.from_env()


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> tuple[dict[str, str], dict[str, str]]:
    """The signing settings of a producer and of a worker, each trusting both."""
    pki = tmp_path_factory.mktemp("pki")
    store = pki / "trusted"
    store.mkdir()
    producer, worker_id = make_identity(pki, "producer"), make_identity(pki, "worker")
    for _, cert in (producer, worker_id):
        (store / cert.name).write_bytes(cert.read_bytes())
    return signing_env(*producer, store), signing_env(*worker_id, store)


def submit(folder: Path, out: Path, checkpoint: Path, queue: str, env: dict[str, str]) -> str:
    """Submit an embed job of the three photo shards without waiting; its job id."""
    result = run_cli("submit", "embed", "--input", f"{folder}/{{00000..00002}}.tar", "--output", str(out), "--model",
                     "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["job_id"]


def test_cancel_with_signing_on_removes_the_jobs_signed_messages_from_the_queue(
        redis_url, photo_shards, checkpoint, tmp_path, trusted):
    # given: two jobs' signed messages queued in one queue, no worker
    producer, _ = trusted
    folder, _ = photo_shards
    queue = f"signed-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, **producer)
    doomed = submit(folder, tmp_path / "a", checkpoint, queue, env)
    other = submit(folder, tmp_path / "b", checkpoint, queue, env)
    r = redis.Redis.from_url(redis_url)
    assert r.llen(queue) == 6

    # when: one is cancelled
    result = run_cli("cancel", doomed, env=env)

    # then: its three messages left the queue (what KEDA counts); the other job's stayed
    assert result.returncode == 0, result.stderr
    assert [feed.message_job(raw) for raw in r.lrange(queue, 0, -1)] == [other] * 3
