"""Security: JSON only on the wire, weights_only checkpoints, no credentials in anything we
write, password-protected Redis, output keys that cannot escape their root."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import boto3
import pytest
import redis
import torch

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.core.storage import StorageError, open_storage
from clipbatch.core.broker import EMBED_SHARD
from clipbatch.core.specs import ModelSpec
from tests.conftest import free_port, redis_pings, run_cli, service_env, wait_for


class Payload:
    """Unpickling this runs a shell command: what a hostile message or checkpoint carries."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.integration
def test_worker_refuses_a_pickle_message(redis_url, tmp_path, start_worker):
    # given: a worker, and a pickle-serialized message whose loading would run a command
    queue = f"sec-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queue, service_env(redis_url))
    marker = tmp_path / "pwned"
    client = Client(Settings(redis_url, 3600, 2, 3600))

    # when: it is published on the worker's queue
    client.app.send_task(EMBED_SHARD, args=[Payload(str(marker))], queue=queue, serializer="pickle")

    # then: the worker refuses to deserialize it, and nothing ran
    wait_for(lambda: "Refusing to deserialize" in worker.log(), 60, "the worker to refuse the message")
    assert not marker.exists()
    assert "shard start" not in worker.log()


def test_checkpoint_with_a_pickled_callable_is_refused(tmp_path):
    from clipbatch.workers.models import load_model

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(str(marker))}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_model(ModelSpec("clipbatch-tiny", str(path)), torch.device("cpu"))
    assert not marker.exists()


def test_local_keys_cannot_escape_the_output_root(tmp_path):
    storage = open_storage(str(tmp_path / "root"))
    for key in ("../outside", "a/../../outside", "/etc/passwd"):
        with pytest.raises(StorageError, match="escape"):
            storage.write(key, b"x")
    assert not (tmp_path / "outside").exists()


@pytest.mark.integration
def test_no_credentials_anywhere_and_a_password_redis(bucket, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a Redis that needs a password, and distinctive S3 credentials
    password, secret = "redis-pass-Q7x9Zt", "aws-secret-K3yW0rd-V8n2"
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis_pings(url), 20, "password Redis")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).set("x", 1)
        folder, built = photo_shards
        boto3.client("s3").upload_file(str(folder / "00000.tar"), bucket, "in/00000.tar")
        env = service_env(url, AWS_ACCESS_KEY_ID="AKIA-DISTINCT-ID-77", AWS_SECRET_ACCESS_KEY=secret)
        queue = f"cred-{uuid.uuid4().hex[:8]}"
        worker = start_worker(queue, env)

        # when: a job runs through the CLI, and a CLI call fails against an unreachable Redis
        submitted = run_cli("submit", "embed", "--input", f"s3://{bucket}/in/00000.tar", "--output",
                            f"s3://{bucket}/out", "--model", "clipbatch-tiny", "--pretrained", str(checkpoint),
                            "--queue", queue, "--wait", "--json", env=env)
        unreachable = run_cli("status", "x", env={**env, "CLIPBATCH_BROKER_URL": f"redis://:{password}@127.0.0.1:{free_port()}/0"})

        # then: it succeeded, and neither secret appears in logs, CLI output, Redis or storage
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["state"] == "succeeded"
        assert unreachable.returncode == 1 and "***" in unreachable.stderr
        s3 = boto3.client("s3")
        stored = b"".join(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                          for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
        everything = [worker.log(), submitted.stdout, submitted.stderr, unreachable.stderr,
                      _dump_redis(url), stored.decode("latin-1")]
        for text in everything:
            assert password not in text and secret not in text
    finally:
        server.kill()
        server.wait()


def _dump_redis(url: str) -> str:
    r = redis.Redis.from_url(url)
    out = []
    for key in r.scan_iter():
        kind = r.type(key).decode()
        dump = {"hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1), "set": r.smembers,
                "zset": lambda k: r.zrange(k, 0, -1), "string": r.get}.get(kind, lambda k: b"")(key)
        out.append(f"{key!r} {dump!r}")
    return "\n".join(out)
