"""End to end against real services: the CLI submits to Redis, a real ``clipbatch worker``
subprocess embeds shards of real photos read from S3 (moto, and SeaweedFS, on loopback) and writes there."""
from __future__ import annotations

import io
import json
import tarfile
import uuid

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import S3_SERVERS, run_cli, service_env
from clipbatch.workers.compute import effective_precision

pytestmark = pytest.mark.integration


def s3_bytes(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def upload_shards(folder, bucket: str, prefix: str = "laion") -> list[str]:
    names = sorted(p.name for p in folder.glob("*.tar"))
    for name in names:
        boto3.client("s3").upload_file(str(folder / name), bucket, f"{prefix}/{name}")
    return names


def samples_by_key(folder) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def submit_and_wait(env, bucket, names, output, checkpoint_uri, queue):
    pattern = f"s3://{bucket}/laion/{{00000..{len(names) - 1:05d}}}.tar"
    submitted = run_cli("submit", "embed", "--input", pattern, "--output", output, "--model", "clipbatch-tiny",
                        "--pretrained", checkpoint_uri, "--batch-size", "8", "--queue", queue, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = run_cli("status", job_id, "--watch", "--json", env=env)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    return json.loads(watched.stdout)


def reference_embeddings(checkpoint, image_bytes: list[bytes], captions: list[str]):
    """open_clip's own preprocess + encode on the same checkpoint, in this process."""
    import open_clip
    from PIL import Image

    import clipbatch.workers.models  # noqa: F401  registers clipbatch-tiny

    model, _, preprocess = open_clip.create_model_and_transforms("clipbatch-tiny", pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer("clipbatch-tiny")
    images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in image_bytes])
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokenizer(captions))
    norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()  # noqa: E731
    return norm(img), norm(txt)


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
def test_submit_embed_s3_end_to_end_then_resubmit(redis_url, bucket, photo_shards, checkpoint, start_worker, tmp_path):
    # given: shards of real photos and the checkpoint in S3, and one real worker on its own queue
    folder, built = photo_shards
    names = upload_shards(folder, bucket)
    boto3.client("s3").upload_file(str(checkpoint), bucket, "models/tiny.pt")
    checkpoint_uri = f"s3://{bucket}/models/tiny.pt"
    queue = f"q-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_CACHE_DIR=str(tmp_path / "cache"))
    worker = start_worker(queue, env)
    output = f"s3://{bucket}/emb/run1"

    # when: a job is submitted through the CLI and watched to the end
    status = submit_and_wait(env, bucket, names, output, checkpoint_uri, queue)

    # then: it succeeded and every input sample is accounted for
    assert status["state"] == "succeeded"
    assert status["shards_total"] == status["shards_done"] == len(names)
    assert status["shards_failed"] == 0
    assert status["samples_done"] == built["good"]
    assert status["samples_failed"] == built["corrupt"]
    for field in ("job_id", "kind", "output"):
        assert status[field]

    # and the layout is clip-retrieval's, row-aligned, float16 and L2-normalised
    keys = s3_keys(bucket, "emb/run1/")
    originals = samples_by_key(folder)
    all_rows, all_img, all_txt = [], [], []
    for i in range(len(names)):
        img = np.load(io.BytesIO(s3_bytes(bucket, f"emb/run1/img_emb/img_emb_{i}.npy")))
        txt = np.load(io.BytesIO(s3_bytes(bucket, f"emb/run1/text_emb/text_emb_{i}.npy")))
        meta = pq.read_table(io.BytesIO(s3_bytes(bucket, f"emb/run1/metadata/metadata_{i}.parquet"))).to_pylist()
        errors = pq.read_table(io.BytesIO(s3_bytes(bucket, f"emb/run1/errors/errors_{i}.parquet"))).to_pylist()
        stats = json.loads(s3_bytes(bucket, f"emb/run1/stats/{i}.json"))
        in_shard = [k for k in originals if k.startswith(f"{i:05d}")]
        assert img.dtype == txt.dtype == np.float16
        assert len(img) == len(txt) == len(meta) == len(in_shard) - len(errors)
        assert {r["key"] for r in meta} | {e["key"] for e in errors} == set(in_shard)
        assert all(e["reason"] for e in errors)
        assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
        assert stats["samples_ok"] == len(meta) and stats["samples_failed"] == len(errors)
        assert stats["precision"] == effective_precision(torch.device("cpu"), "bf16")  # the default, as it ran
        assert meta[0]["shard"].endswith(names[i]) and "source" in meta[0]  # json fields pass through
        all_rows += meta
        all_img.append(img)
        all_txt.append(txt)
    assert "emb/run1/_job.json" in keys
    assert not [k for k in keys if "/_tmp/" in k]
    job_record = json.loads(s3_bytes(bucket, "emb/run1/_job.json"))
    assert job_record["samples_done"] == built["good"] and job_record["spec"]["model"]["name"] == "clipbatch-tiny"

    # and every embedding matches open_clip's own computation on the same checkpoint
    ref_img, ref_txt = reference_embeddings(
        checkpoint, [originals[r["key"]]["jpg"] for r in all_rows], [r["caption"] for r in all_rows]
    )
    got_img = np.concatenate(all_img).astype(np.float32)
    got_txt = np.concatenate(all_txt).astype(np.float32)
    assert np.einsum("ij,ij->i", got_img, ref_img).min() >= 0.995
    assert np.einsum("ij,ij->i", got_txt, ref_txt).min() >= 0.995

    # when: the finished job is resubmitted
    markers = {k: s3_bytes(bucket, k) for k in s3_keys(bucket, "emb/run1/_commits/")}
    again = submit_and_wait(env, bucket, names, output, checkpoint_uri, queue)

    # then: zero shards run; nothing in storage changed
    assert again["state"] == "succeeded" and again["shards_skipped"] == len(names)
    assert again["samples_done"] == built["good"]
    assert {k: s3_bytes(bucket, k) for k in s3_keys(bucket, "emb/run1/_commits/")} == markers

    # when: one shard's marker and outputs are deleted, and the job resubmitted
    s3 = boto3.client("s3")
    for key in keys:
        if key.endswith(("/_commits/00001.json", "img_emb_1.npy", "text_emb_1.npy", "metadata_1.parquet",
                         "errors_1.parquet", "/stats/1.json")):
            s3.delete_object(Bucket=bucket, Key=key)
    third = submit_and_wait(env, bucket, names, output, checkpoint_uri, queue)

    # then: exactly that shard ran again
    assert third["state"] == "succeeded" and third["shards_skipped"] == len(names) - 1
    assert third["samples_done"] == built["good"]
    after = {k: s3_bytes(bucket, k) for k in s3_keys(bucket, "emb/run1/_commits/")}
    assert {k: v for k, v in after.items() if not k.endswith("00001.json")} == {
        k: v for k, v in markers.items() if not k.endswith("00001.json")
    }
    assert json.loads(after["emb/run1/_commits/00001.json"])["attempt"] != json.loads(
        markers["emb/run1/_commits/00001.json"])["attempt"]
    assert worker.log().count("shard committed") == len(names) + 1

    # and the worker process loaded the model once, from one cached download of the s3:// checkpoint
    assert worker.log().count("loaded on cpu") == 1
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 1
