"""The options that describe an embed or score job, shared by ``clipbatch submit`` and ``clipbatch run``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from clipbatch.core.specs import (DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE, DEFAULT_SAMPLES_PER_INPUT_SHARD, INPUT_FORMATS,
                                  MODALITIES, JobSpec, ModelSpec, SpecError)

KIND_HELP = {
    "embed": "Embed every image and caption of the input shards (and score each pair); or, with --modality, "
             "images only or captions only.",
    "score": "Score every pair (clip_score); only shards without a result for this model run.",
}


def job_options(fn):
    options = [
        click.option("--input", "input_", required=True,
                     help="Shard, brace pattern ({00000..00099}), file, folder or s3:// prefix."),
        click.option("--input-format", type=click.Choice(INPUT_FORMATS), default="auto", show_default=True,
                     help="auto: a file by its extension; a folder by what it holds (tar > parquet > manifest > images)."),
        click.option("--image-col", help="Parquet/manifest column of image bytes or a path/URI [default: image]; "
                                         "for tars, the image member's extension [default: jpg/jpeg/png/webp]."),
        click.option("--caption-col", help="Parquet/manifest column of the caption [default: caption]; for tars, "
                                           "the caption member's extension (caption: key.caption) or json:FIELD "
                                           "of the .json sidecar [default: txt]."),
        click.option("--key-col", help="Parquet/manifest column of the sample key [default: file stem and row]."),
        click.option("--samples-per-shard", type=int,
                     help=f"Folder/manifest samples per shard task [default: {DEFAULT_SAMPLES_PER_INPUT_SHARD}]; "
                          "for parquet, split files into row groups of about this many rows."),
        click.option("--output", required=True, help="Output folder or s3://bucket/prefix."),
        click.option("--model", help="open_clip model name, e.g. ViT-B-32 or clipbatch-tiny."),
        click.option("--pretrained", help="open_clip pretrained tag, checkpoint path or s3:// URI."),
        click.option("--model-config", type=click.Path(dir_okay=False), help="JSON config for an architecture open_clip does not know."),
        click.option("--batch-size", type=int, default=None,
                     help=f"Pairs per batch [default: the worker's choice: {DEFAULT_BATCH_SIZE} on a CPU, "
                          f"{DEFAULT_CUDA_BATCH_SIZE} on CUDA, halved while it does not fit]."),
        click.option("--json", "as_json", is_flag=True, help="Print the job status as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def spec_from_options(kind: str, input_: str, output: str, model: str | None, pretrained: str | None,
                      model_config: str | None, batch_size: int | None, queue: str, no_embeddings: bool = False,
                      **input_options: Any) -> JobSpec:
    """A validated embed/score spec; ``input_options`` are JobSpec's input fields (format, columns, shard size)."""
    config = None
    if model_config:
        try:
            config = json.loads(Path(model_config).read_text())
        except (OSError, ValueError) as exc:
            raise SpecError("model_config", f"{model_config}: cannot read JSON ({exc})") from None
        model = model or Path(model_config).stem
    if not model:
        raise SpecError("model", "is required (or give --model-config FILE.json)")
    spec = JobSpec(input_, output, ModelSpec(model, pretrained, config), batch_size=batch_size, queue=queue,
                   kind=kind, embeddings=not no_embeddings, **input_options)
    spec.validate()
    return spec


def with_kind_options(kind: str, fn):
    fn = job_options(fn)
    if kind == "score":
        fn = click.option("--no-embeddings", is_flag=True, help="Write scores only, not the embedding arrays.")(fn)
    if kind == "embed":
        fn = click.option("--modality", type=click.Choice(MODALITIES), default="pairs", show_default=True,
                          help="pairs: images and captions, scored; image: images only (captions kept as metadata "
                               "when there); text: captions only (no image is read).")(fn)
    return fn
