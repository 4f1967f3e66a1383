"""S3 that throttles, errors and drops connections: retries with backoff, and the job's data
files come out byte-identical to a fault-free run."""
from __future__ import annotations

import uuid
from urllib.parse import urlparse

import boto3
import pytest

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.core.specs import JobSpec, ModelSpec
from tests.conftest import service_env
from tests.s3proxy import FaultyS3Proxy

pytestmark = pytest.mark.integration
DATA_PREFIXES = ("img_emb/", "text_emb/", "metadata/", "errors/")


def data_files(bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    return {k[len(prefix):]: s3.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in keys if k[len(prefix):].startswith(DATA_PREFIXES)}


def run_job(redis_url, bucket, output, checkpoint, queue) -> dict:
    client = Client(Settings(redis_url, 3600, 2, 3600))
    spec = JobSpec(f"s3://{bucket}/in/{{00000..00002}}.tar", f"s3://{bucket}/{output}",
                        ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=8, queue=queue)
    return client.submit(spec).wait(timeout_s=300)


def test_job_survives_s3_faults_with_identical_outputs(redis_url, bucket, s3_endpoint, photo_shards, checkpoint,
                                                       start_worker):
    # given: the same shards, and a worker whose S3 goes through a proxy that fails 12% of requests
    folder, built = photo_shards
    for i in range(3):
        boto3.client("s3").upload_file(str(folder / f"{i:05d}.tar"), bucket, f"in/{i:05d}.tar")
    upstream = urlparse(s3_endpoint)
    queue_ok, queue_bad = f"ok-{uuid.uuid4().hex[:6]}", f"bad-{uuid.uuid4().hex[:6]}"
    start_worker(queue_ok, service_env(redis_url))
    with FaultyS3Proxy((upstream.hostname, upstream.port), fault_rate=0.12, seed=4) as proxy:
        faulty = start_worker(queue_bad, service_env(redis_url, AWS_ENDPOINT_URL_S3=proxy.url))

        # when: the job runs once without faults and once through the faulty proxy
        clean = run_job(redis_url, bucket, "clean", checkpoint, queue_ok)
        status = run_job(redis_url, bucket, "faulty", checkpoint, queue_bad)

    # then: both succeeded with whole totals, faults really happened, and the data files are identical
    assert clean["state"] == status["state"] == "succeeded", status
    assert (status["samples_done"], status["samples_failed"]) == (built["good"], built["corrupt"])
    assert sum(proxy.faults[k] for k in ("500", "503", "drop")) >= 5 and proxy.faults["after_landing"] >= 1
    assert "shard committed" in faulty.log()
    clean_files, faulty_files = data_files(bucket, "clean/"), data_files(bucket, "faulty/")
    assert len(clean_files) == 12 and clean_files == faulty_files
    print(f"S3 proxy: {proxy.requests} requests, faults injected {proxy.faults}")
