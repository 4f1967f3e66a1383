"""The same shard executed twice at once by two real workers: one commit wins, counters stay right."""
from __future__ import annotations

import io
import json
import uuid

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.core.broker import EMBED_SHARD
from clipbatch.core.specs import JobSpec, ModelSpec, ShardSpec
from tests.conftest import service_env, wait_for
from clipbatch.sample_data import build_collection

pytestmark = pytest.mark.integration


def test_duplicate_delivery_runs_concurrently_and_commits_once(redis_url, bucket, checkpoint, tmp_path, start_worker):
    # given: one shard big enough that two attempts overlap, and two idle workers on one queue
    built = build_collection(tmp_path / "in", shards=1, samples_per_shard=160, seed=7, corrupt_per_shard=2)
    boto3.client("s3").upload_file(str(tmp_path / "in" / "00000.tar"), bucket, "in/00000.tar")
    queue = f"dup-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    workers = [start_worker(queue, env), start_worker(queue, env)]
    client = Client(Settings(redis_url, 3600, 2, 3600))
    spec = JobSpec(f"s3://{bucket}/in/00000.tar", f"s3://{bucket}/out", ModelSpec("clipbatch-tiny", str(checkpoint)),
                        batch_size=16, queue=queue)

    # when: the job is submitted and its shard message is delivered a second time right away
    job = client.submit(spec)
    duplicate = ShardSpec(job.job_id, 0, spec.input, spec).message()
    client.app.send_task(EMBED_SHARD, args=duplicate, queue=queue)
    status = job.wait(timeout_s=300)
    logs = lambda: "".join(w.log() for w in workers)  # noqa: E731
    wait_for(lambda: logs().count("] succeeded in") >= 2, 120, "both deliveries to finish")

    # then: both attempts computed, exactly one committed, and the job counted the shard once
    assert logs().count("shard start") == 2
    assert logs().count("shard committed") == 1 and logs().count("shard lost_race") == 1
    assert status["state"] == "succeeded"
    assert (status["shards_done"], status["samples_done"], status["samples_failed"]) == (1, built["good"], built["corrupt"])
    assert client.job(job.job_id).status()["shards_done"] == 1

    # and storage holds one consistent set of outputs: the winner's
    s3 = boto3.client("s3")
    read = lambda key: s3.get_object(Bucket=bucket, Key=f"out/{key}")["Body"].read()  # noqa: E731
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    assert not [k for k in keys if "/_tmp/" in k]
    assert len([k for k in keys if "/_commits/" in k]) == 1
    marker = json.loads(read("_commits/00000.json"))
    assert json.loads(read("stats/0.json"))["attempt"] == marker["attempt"]
    rows = pq.read_table(io.BytesIO(read("metadata/metadata_0.parquet"))).num_rows
    assert len(np.load(io.BytesIO(read("img_emb/img_emb_0.npy")))) == rows == built["good"]
