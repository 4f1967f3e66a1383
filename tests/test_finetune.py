"""Contrastive fine-tuning as a chain of shard steps on real workers: it learns, it resumes
from the last committed checkpoint after a SIGKILL, and its checkpoint loads everywhere."""
from __future__ import annotations

import json
import os
import re
import signal
import uuid

import open_clip
import pytest

from tests.conftest import run_cli, service_env, wait_for
from clipbatch.workers.finetune import zero_shot_accuracy
from clipbatch.sample_data import shape_classes, shape_collection

pytestmark = pytest.mark.integration
SHARDS, EPOCHS = 4, 6


def accuracy(checkpoint, images, labels) -> float:
    model, _, preprocess = open_clip.create_model_and_transforms("clipbatch-tiny", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("clipbatch-tiny")
    return zero_shot_accuracy(model, preprocess, tokenizer, images, labels, shape_classes())


def test_finetune_learns_and_resumes_after_sigkill(redis_url, checkpoint, tmp_path, start_worker):
    # given: a synthetic collection of coloured shapes, a held-out set, and the tiny model
    train = tmp_path / "train"
    shape_collection(train, per_class=24, shards=SHARDS, seed=1)
    held_images, held_labels = shape_collection(None, per_class=4, seed=2)
    before = accuracy(checkpoint, held_images, held_labels)
    queue, out = f"ft-{uuid.uuid4().hex[:8]}", tmp_path / "ft"
    env = service_env(redis_url, CLIPBATCH_VISIBILITY_TIMEOUT="5")
    first = start_worker(queue, env)

    # when: a fine-tune runs, its worker is SIGKILLed mid-step, and a new worker takes over
    submitted = run_cli("submit", "finetune", "--train", f"{train}/{{00000..{SHARDS - 1:05d}}}.tar", "--output",
                        str(out), "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--epochs",
                        str(EPOCHS), "--lr", "1e-3", "--batch-size", "32", "--queue", queue, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    wait_for(lambda: re.search(r"shard start job=\S+ shard=([5-9]|1\d) ", first.log()), 300, "step 5 to start")
    killed_at = int(re.findall(r"shard start job=\S+ shard=(\d+) ", first.log())[-1])
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    second = start_worker(queue, env)
    watched = run_cli("status", job_id, "--watch", "--json", env=env, timeout=600)

    # then: the job completed, resuming at the killed step from its predecessor's checkpoint
    assert watched.returncode == 0, watched.stdout + watched.stderr
    status = json.loads(watched.stdout)
    steps = SHARDS * EPOCHS
    assert (status["state"], status["shards_done"], status["step"]) == ("succeeded", steps, steps - 1)
    resumed = [int(k) for k in re.findall(r"shard start job=\S+ shard=(\d+) ", second.log())]
    assert resumed[0] == killed_at and resumed == list(range(killed_at, steps))  # no restart from 0, no gap
    metrics = [json.loads((out / "metrics" / f"step_{k:05d}.json").read_text()) for k in range(steps)]
    assert [m["step"] for m in metrics] == list(range(steps))
    for k, m in enumerate(metrics):
        assert json.loads((out / "_commits" / f"{k:05d}.json").read_text())["attempt"] == m["attempt"]
    assert (out / "report" / "loss.png").is_file()

    # and it learned: zero-shot retrieval on held-out shapes, through open_clip's own loader
    after = accuracy(out / "checkpoints" / "final.pt", held_images, held_labels)
    chance = 1 / len(shape_classes())
    print(f"\nzero-shot accuracy on held-out shapes: before {before:.3f}, after {after:.3f}, chance {chance:.3f}")
    assert after >= 5 * chance and after >= 3 * before

    # and the final checkpoint serves an embed job
    embedded = run_cli("submit", "embed", "--input", str(train / "00000.tar"), "--output", str(tmp_path / "emb"),
                       "--model", "clipbatch-tiny", "--pretrained", str(out / "checkpoints" / "final.pt"),
                       "--queue", queue, "--wait", "--json", env=env)
    assert embedded.returncode == 0 and json.loads(embedded.stdout)["state"] == "succeeded"
