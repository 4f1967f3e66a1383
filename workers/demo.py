"""``clipbatch demo``: real photos -> shards -> embedded job -> a summary, on any machine."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from orchestration.embedded import run_embedded
from tasks.specs import JobSpec, ModelSpec
from workers.models import save_seeded_checkpoint
from workers.samples import build_collection

DEMO_MODEL = "clipbatch-tiny"


def run_demo(workdir: Path, shards: int, samples_per_shard: int) -> dict:
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
    rows = sum(len(a) for a in img)
    summary = {
        "job_id": status["job_id"],
        "state": status["state"],
        "shards": f"{status['shards_done']}/{status['shards_total']} ({status['shards_skipped']} already committed)",
        "samples_embedded": status["samples_done"],
        "samples_recorded_as_errors": status["samples_failed"],
        "embedding_rows_on_disk": rows,
        "embedding_dim": int(img[0].shape[1]) if img else 0,
        "wall_seconds_including_worker_start": round(seconds, 1),
        "output": str(output),
    }
    click.echo(json.dumps(summary, indent=2))
    return summary
