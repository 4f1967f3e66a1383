"""What one shard's commit costs on S3: storage writes counted through a proxy in front of moto, and
boto3 clients per worker process (one, however many shards it commits)."""
from __future__ import annotations

import json
import re
import uuid
from urllib.parse import urlparse

import boto3
import pytest

from clipbatch.core import commit, layout
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.core.storage import clients_built, open_storage
from clipbatch.orchestration.client import Client
from clipbatch.sample_data import build_collection
from tests.conftest import service_env
from tests.s3proxy import FaultyS3Proxy

pytestmark = pytest.mark.integration

CLIENT_BUILT = "Found credentials"  # botocore logs it (INFO) each time a client is built
JOB_SHARDS = (2, 6)  # two jobs: the difference cancels each job's fixed costs
WRITES_PER_SHARD = 8


@pytest.fixture()
def counted(s3_endpoint, bucket, monkeypatch):
    """An output on moto whose every request this process makes goes through a counting proxy."""
    upstream = urlparse(s3_endpoint)
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield open_storage(f"s3://{bucket}/out"), proxy, f"/{bucket}/out/"


def embed_files(index: int, tag: str) -> dict[str, bytes]:
    return {name: f"{role}-{tag}".encode() * 100 for role, name in layout.embed_files(index).items()}


def final_writes(proxy: FaultyS3Proxy, root: str) -> list[str]:
    """Keys outside _tmp/ and _commits/ that requests wrote to."""
    keys = [path.removeprefix(root) for kind, path in proxy.calls if kind in ("PUT", "COPY", "DELETE", "POST")]
    return [k for k in keys if not k.startswith((layout.TMP_DIR + "/", layout.MARKER_DIR + "/"))]


def test_an_embed_shard_commits_in_eight_writes(counted):
    # given: an embed shard's five files
    storage, proxy, root = counted
    files = embed_files(7, "w")
    proxy.reset()
    clients_before = clients_built()  # other tests in this process may have met other endpoints

    # when: it commits
    won, marker = commit.commit(storage, 7, "attempt-w", files, {"samples_ok": 1, "samples_failed": 0})

    # then: one staged bundle, the marker, five files, one delete: no copies, nothing left staged
    assert won and marker["staging"] == commit.STAGING_BUNDLE
    assert proxy.snapshot() == {"PUT": 7, "DELETE": 1}
    assert sorted(final_writes(proxy, root)) == sorted(files)
    assert {name: storage.read(name) for name in files} == files
    assert storage.list(layout.TMP_DIR + "/") == []
    assert clients_built() - clients_before <= 1  # at most the proxy's endpoint's: not one per thread


def test_a_late_attempt_writes_no_final_name(counted):
    # given: a committed shard
    storage, proxy, root = counted
    commit.commit(storage, 7, "attempt-w", embed_files(7, "w"), {"samples_ok": 1})
    etags = {name: storage.info(name).etag for name in embed_files(7, "w")}
    proxy.reset()

    # when: a late attempt with other bytes commits the same shard
    won, marker = commit.commit(storage, 7, "attempt-late", embed_files(7, "late"), {"samples_ok": 1})

    # then: it lost, wrote only its bundle, the refused marker and its bundle's delete, and the files are untouched
    assert not won and marker["attempt"] == "attempt-w"
    assert final_writes(proxy, root) == []
    assert proxy.snapshot()["PUT"] == 2 and proxy.writes() == 3
    assert {name: storage.info(name).etag for name in etags} == etags
    assert storage.list(layout.TMP_DIR + "/") == []


def test_a_winner_dead_after_its_marker_is_finished_with_its_bytes(counted):
    # given: the winner staged its bundle, won the marker, put one final file and died
    storage, proxy, root = counted
    files = embed_files(7, "w")
    storage.write(layout.bundle("attempt-w"), commit.pack(files))
    marker = {"index": 7, "attempt": "attempt-w", "files": sorted(files), "staging": commit.STAGING_BUNDLE,
              "samples_ok": 1}
    assert storage.create_exclusive(layout.marker(7), json.dumps(marker).encode())
    first = sorted(files)[0]
    storage.write(first, files[first])
    assert not commit.is_finished(storage, marker)
    proxy.reset()

    # when: the next attempt (another device, other bytes) commits
    won, seen = commit.commit(storage, 7, "attempt-next", embed_files(7, "next"), {"samples_ok": 1})

    # then: it lost, and finished the winner's move with the winner's bytes only
    assert not won and seen["attempt"] == "attempt-w"
    assert {name: storage.read(name) for name in files} == files
    assert commit.is_finished(storage, seen) and storage.list(layout.TMP_DIR + "/") == []
    assert sorted(final_writes(proxy, root)) == sorted(files)


def commit_seconds(log: str, job_id: str) -> list[float]:
    return [float(s) for s in re.findall(rf"shard committed job={job_id} .*?commit_s=([0-9.]+)", log)]


def test_a_worker_builds_one_client_and_commits_in_few_writes(redis_url, s3_endpoint, bucket, checkpoint, tmp_path,
                                                              start_worker):
    # given: 1-sample shards on S3, a worker talking to S3 through a counting proxy
    upstream = urlparse(s3_endpoint)
    build_collection(tmp_path / "in", shards=max(JOB_SHARDS), samples_per_shard=1, seed=3, corrupt_per_shard=0)
    for path in sorted((tmp_path / "in").glob("*.tar")):
        for shards in JOB_SHARDS:
            if int(path.stem) < shards:
                boto3.client("s3").upload_file(str(path), bucket, f"in{shards}/{path.name}")
    queue = f"cost-{uuid.uuid4().hex[:8]}"
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0) as proxy:
        env = service_env(redis_url, AWS_ENDPOINT_URL_S3=proxy.url)
        worker = start_worker(queue, env)
        client = Client(Settings(redis_url, 3600, 2, 3600))
        clients, writes, seconds, kinds = {}, {}, {}, {}
        # when: a small and a larger job run on the one worker
        for shards in JOB_SHARDS:
            proxy.reset()
            spec = JobSpec(f"s3://{bucket}/in{shards}/", f"s3://{bucket}/out{shards}",
                           ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=4, queue=queue)
            job = client.submit(spec)
            assert job.wait(timeout_s=300)["state"] == "succeeded"
            writes[shards], clients[shards] = proxy.writes(), worker.log().count(CLIENT_BUILT)
            kinds[shards] = proxy.snapshot()
            seconds[shards] = commit_seconds(worker.log(), job.job_id)
        worker.stop()

    # then: the second job built no client (the first built the process's one), and a shard costs few writes
    (small, large) = JOB_SHARDS
    per_shard = (writes[large] - writes[small]) / (large - small)
    by_kind = {k: (kinds[large][k] - kinds[small][k]) / (large - small) for k in kinds[large]}
    print(f"commit_s per shard: {seconds}; writes per job: {writes}; per shard: {per_shard:.1f}; "
          f"requests per shard by kind: {by_kind}; '{CLIENT_BUILT}' lines after each job: {clients}")
    assert len(seconds[large]) == large
    assert clients[large] == clients[small] >= 1
    assert per_shard <= WRITES_PER_SHARD
