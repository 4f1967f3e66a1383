"""TLS to Redis for real: a redis-server with --tls-port and certificates made here, a job over
rediss:// with CA verification through a real worker, and a wrong CA refused in one line."""
from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port, redis_pings, run_cli, service_env, wait_for

pytestmark = pytest.mark.integration
PASSWORD = "tls-pass-4Rz"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, obj) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed for 127.0.0.1, and an unrelated CA."""
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    return {
        "ca": _write(folder / "ca.pem", _cert("clipbatch test CA", ca_key, "clipbatch test CA", ca_key, ca=True)),
        "wrong_ca": _write(folder / "wrong-ca.pem", _cert("someone else", other_key, "someone else", other_key, True)),
        "cert": _write(folder / "server.pem", _cert("127.0.0.1", server_key, "clipbatch test CA", ca_key, ca=False)),
        "key": _write(folder / "server.key", server_key),
    }


@pytest.fixture()
def tls_redis(tmp_path):
    pki = make_pki(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", PASSWORD, "--tls-cert-file", str(pki["cert"]),
         "--tls-key-file", str(pki["key"]), "--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "no"],
        stdout=open(tmp_path / "redis.log", "wb"), stderr=subprocess.STDOUT)

    def url(ca: Path) -> str:
        return f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    try:
        wait_for(lambda: redis_pings(url(pki["ca"])), 20, "the TLS redis-server")
        yield url, pki, port
    finally:
        server.kill()
        server.wait()


def test_a_job_runs_over_tls_with_ca_verification(tls_redis, photo_shards, checkpoint, tmp_path, start_worker):
    url, pki, port = tls_redis
    folder, _ = photo_shards
    env = service_env(url(pki["ca"]))
    queue = f"tls-{uuid.uuid4().hex[:8]}"

    # given: the server speaks only TLS (a plain connection gets nowhere)
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, password=PASSWORD, socket_timeout=2).ping()

    # when: a real worker and a submit both connect over rediss:// verifying the server against the CA
    start_worker(queue, env)
    result = run_cli("submit", "embed", "--input", str(folder / "00000.tar"), "--output", str(tmp_path / "out"),
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--wait",
                     "--json", env=env)

    # then: the job succeeded over TLS
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "succeeded"


@pytest.mark.parametrize("command", [("status", "some-job"), ("jobs",)])
def test_a_wrong_ca_is_refused_in_one_line(tls_redis, command):
    url, pki, _ = tls_redis
    result = run_cli(*command, env=service_env(url(pki["wrong_ca"])))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "certificate verify failed" in result.stderr and PASSWORD not in result.stderr
