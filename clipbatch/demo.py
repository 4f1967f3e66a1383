"""``clipbatch demo``: real photos -> shards -> embedded job -> a summary; then a fine-tune of
the tiny model on synthetic coloured shapes, with zero-shot accuracy before and after."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import open_clip

from clipbatch.orchestration.embedded import run_embedded
from clipbatch.core.specs import FinetuneSpec, JobSpec, ModelSpec
from clipbatch.workers.finetune import zero_shot_accuracy
from clipbatch.workers.models import save_seeded_checkpoint
from clipbatch.sample_data import build_collection, shape_classes, shape_collection

DEMO_MODEL = "clipbatch-tiny"
SHAPE_SHARDS, SHAPE_EPOCHS = 4, 6


def run_demo(workdir: Path, shards: int, samples_per_shard: int, finetune: bool = True) -> dict:
    """Build the collection and checkpoint if missing, run the job, print what it produced."""
    workdir = workdir.absolute()
    inputs, output = workdir / "shards", workdir / "out"
    if not any(inputs.glob("*.tar")):
        built = build_collection(inputs, shards, samples_per_shard)
        click.echo(f"built {built['shards']} shards from real photos: {built['good']} pairs, {built['corrupt']} corrupt")
    checkpoint = workdir / f"{DEMO_MODEL}-seed0.pt"
    if not checkpoint.is_file():
        save_seeded_checkpoint(DEMO_MODEL, checkpoint, seed=0)
    spec = JobSpec(str(inputs), str(output), ModelSpec(DEMO_MODEL, str(checkpoint)), batch_size=64)
    click.echo(f"embedding {inputs} -> {output} with {DEMO_MODEL} on a private Redis and one worker")
    start = time.perf_counter()
    status = run_embedded(spec, workers=1, device="auto", workdir=workdir / "run")
    seconds = time.perf_counter() - start
    img = [np.load(p) for p in sorted((output / "img_emb").glob("*.npy"))]
    summary = {
        "job_id": status["job_id"],
        "state": status["state"],
        "shards": f"{status['shards_done']}/{status['shards_total']} ({status['shards_skipped']} already committed)",
        "samples_embedded": status["samples_done"],
        "samples_recorded_as_errors": status["samples_failed"],
        "embedding_rows_on_disk": sum(len(a) for a in img),
        "embedding_dim": int(img[0].shape[1]) if img else 0,
        "wall_seconds_including_worker_start": round(seconds, 1),
        "output": str(output),
    }
    click.echo(json.dumps(summary, indent=2))
    if finetune:
        summary["finetune"] = _finetune_demo(workdir, checkpoint)
    return summary


def _accuracy(checkpoint: Path, images, labels) -> float:
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=str(checkpoint))
    return zero_shot_accuracy(model, preprocess, open_clip.get_tokenizer(DEMO_MODEL), images, labels, shape_classes())


def _finetune_demo(workdir: Path, checkpoint: Path) -> dict:
    """Fine-tune on coloured shapes ('a red circle', ...) and measure held-out zero-shot accuracy."""
    train, output = workdir / "shapes", workdir / "finetune"
    if not any(train.glob("*.tar")):
        shape_collection(train, per_class=24, shards=SHAPE_SHARDS, seed=1)
    held_images, held_labels = shape_collection(None, per_class=4, seed=2)
    before = _accuracy(checkpoint, held_images, held_labels)
    spec = FinetuneSpec(f"{train}/{{00000..{SHAPE_SHARDS - 1:05d}}}.tar", str(output),
                        ModelSpec(DEMO_MODEL, str(checkpoint)), epochs=SHAPE_EPOCHS, lr=1e-3, batch_size=32)
    click.echo(f"fine-tuning {DEMO_MODEL} on {len(shape_classes())} classes of coloured shapes "
               f"({SHAPE_SHARDS} shards x {SHAPE_EPOCHS} epochs, one shard per step)")
    status = run_embedded(spec, workers=1, device="auto", workdir=workdir / "run-finetune")
    after = _accuracy(output / "checkpoints" / "final.pt", held_images, held_labels)
    result = {"state": status["state"], "steps": status["shards_done"], "final_loss": status.get("loss"),
              "zero_shot_accuracy_before": round(before, 3), "zero_shot_accuracy_after": round(after, 3),
              "chance": round(1 / len(shape_classes()), 3), "checkpoint": str(output / "checkpoints" / "final.pt")}
    click.echo(json.dumps(result, indent=2))
    return result

