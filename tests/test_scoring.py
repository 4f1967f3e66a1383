"""Scoring and incremental nightly runs against real Redis, a real worker and S3 on loopback."""
from __future__ import annotations

import io
import json
import re
import uuid

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import run_cli, service_env
from tests.test_e2e_s3 import upload_shards, reference_embeddings, s3_bytes, samples_by_key
from clipbatch.workers.models import save_seeded_checkpoint
from clipbatch.sample_data import build_collection

pytestmark = pytest.mark.integration


def score(env, bucket, checkpoint, queue, *extra):
    result = run_cli("submit", "score", "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/scores",
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--batch-size", "8",
                     "--queue", queue, "--wait", "--json", *extra, env=env)
    return result


def test_score_nightly_incremental_and_report(redis_url, bucket, photo_shards, checkpoint, tmp_path, start_worker):
    # given: three shards in S3 and a worker
    folder, built = photo_shards
    s3 = boto3.client("s3")
    upload_shards(folder, bucket, "in")
    queue = f"score-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    worker = start_worker(queue, env)

    # when: run 1 scores the dataset
    first = score(env, bucket, checkpoint, queue)
    assert first.returncode == 0, first.stderr
    status = json.loads(first.stdout)

    # then: every shard ran, and each score is the cosine of the stored embeddings and open_clip's own
    assert (status["kind"], status["state"], status["shards_total"], status["shards_skipped"]) == ("score", "succeeded", 3, 0)
    originals = samples_by_key(folder)
    scores, rows = [], []
    for i in range(3):
        meta = pq.read_table(io.BytesIO(s3_bytes(bucket, f"scores/metadata/metadata_{i}.parquet"))).to_pylist()
        img = np.load(io.BytesIO(s3_bytes(bucket, f"scores/img_emb/img_emb_{i}.npy"))).astype(np.float32)
        txt = np.load(io.BytesIO(s3_bytes(bucket, f"scores/text_emb/text_emb_{i}.npy"))).astype(np.float32)
        got = np.array([r["clip_score"] for r in meta])
        stored = np.einsum("ij,ij->i", img, txt) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))
        np.testing.assert_allclose(got, stored, atol=2e-3)  # fp16 storage precision
        scores.append(got)
        rows += meta
    ref_img, ref_txt = reference_embeddings(checkpoint, [originals[r["key"]]["jpg"] for r in rows],
                                            [r["caption"] for r in rows])
    # the worker decodes large JPEGs in draft mode (embeddings within cosine 0.995 of this full
    # decode, tests/test_fast_decode.py), which moves scores by up to ~0.005; a pairing or
    # normalisation bug would move them by tenths
    np.testing.assert_allclose(np.concatenate(scores), np.einsum("ij,ij->i", ref_img, ref_txt), atol=1e-2)

    # and the report's quantiles match numpy's over all scores, from merged per-shard histograms
    summary = json.loads(s3_bytes(bucket, "scores/report/summary.json"))
    every = np.concatenate(scores)
    assert summary["count"] == len(every) == built["good"]
    for p in (1, 5, 10, 25, 50, 75, 90, 95, 99):
        assert abs(summary["quantiles"][f"p{p}"] - np.quantile(every, p / 100)) <= 0.001
    assert abs(summary["mean"] - every.mean()) < 1e-6 and abs(summary["std"] - every.std()) < 1e-6
    for t in ("0.20", "0.25", "0.28", "0.30"):
        assert summary["fraction_kept"][t] == pytest.approx((every >= float(t)).mean())
    png = Image.open(io.BytesIO(s3_bytes(bucket, "scores/report/scores.png")))
    png.verify()
    assert png.format == "PNG"
    page = s3_bytes(bucket, "scores/report/index.html").decode()
    assert 'src="scores.png"' in page and f"{summary['quantiles']['p50']:.4f}" in page
    printed = run_cli("report", f"s3://{bucket}/scores", env=env)
    assert printed.returncode == 0 and "p50" in printed.stdout and "Traceback" not in printed.stderr

    # when: run 2 has nothing new
    second = json.loads(score(env, bucket, checkpoint, queue).stdout)

    # then: it ends at once, having run nothing
    assert (second["state"], second["shards_skipped"], second["shards_total"]) == ("succeeded", 3, 3)
    assert worker.log().count("shard start") == 3

    # when: one shard appears and one is rewritten, then run 3
    build_collection(tmp_path / "more", shards=2, samples_per_shard=7, seed=9)
    s3.upload_file(str(tmp_path / "more" / "00000.tar"), bucket, "in/00003.tar")
    s3.upload_file(str(tmp_path / "more" / "00001.tar"), bucket, "in/00001.tar")
    third = json.loads(score(env, bucket, checkpoint, queue).stdout)

    # then: exactly those two ran; the rewritten one kept its index, the new one took the next
    assert (third["shards_total"], third["shards_skipped"], third["shards_rescored"]) == (4, 2, 1)
    assert worker.log().count("shard start") == 5
    started = re.findall(r"shard start job=\S+ shard=(\d+)", worker.log())[-2:]
    assert sorted(started) == ["1", "3"]
    assert len(pq.read_table(io.BytesIO(s3_bytes(bucket, "scores/metadata/metadata_1.parquet")))) == 7
    assert json.loads(s3_bytes(bucket, "scores/report/summary.json"))["count"] == built["good"] - 20 + 2 * 7


def test_scores_only_and_a_second_model_is_refused(redis_url, bucket, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a dataset scored without embeddings
    folder, _ = photo_shards
    boto3.client("s3").upload_file(str(folder / "00000.tar"), bucket, "in/00000.tar")
    queue = f"noemb-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url)
    start_worker(queue, env)
    result = score(env, bucket, checkpoint, queue, "--no-embeddings")
    assert result.returncode == 0, result.stderr
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="scores/")["Contents"]]
    assert "scores/metadata/metadata_0.parquet" in keys and not [k for k in keys if "_emb/" in k]

    # when: another model's weights are sent to the same output
    other = save_seeded_checkpoint("clipbatch-tiny", tmp_path / "other.pt", seed=1)
    refused = score(env, bucket, other, queue)

    # then: refused at submit, naming the output and the fingerprints
    assert refused.returncode == 2 and refused.stderr.startswith("error: --output:") and "another model" in refused.stderr
    assert "Traceback" not in refused.stderr
