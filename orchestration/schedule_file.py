"""Nightly schedules: a TOML file of datasets, each scored (or embedded) incrementally at a cron time.

    [[dataset]]
    name = "crawl-2026"                    # unique; names the beat entry
    input = "s3://bkt/crawl/"              # pattern or prefix; new shards are picked up each run
    output = "s3://bkt/scores/crawl-2026"
    model = "ViT-B-32"
    pretrained = "laion2b_s34b_b79k"
    cron = "0 2 * * *"                     # minute hour day-of-month month day-of-week, UTC
    queue = "gpu"                          # optional (default gpu)
    embeddings = false                     # optional (default true): write the arrays too
    batch_size = 256                       # optional (default: the worker's choice for its device)
    input_format = "parquet"               # optional (default auto), with image_col, caption_col,
    image_col = "jpg"                      #   key_col and samples_per_shard as on the command line
    kind = "embed"                         # optional (default score)
    modality = "image"                     # optional (default pairs): image or text for an embed job
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from celery.schedules import crontab

from clipbatch.core.config import DEFAULT_QUEUE
from clipbatch.core.specs import JobSpec, ModelSpec, SpecError

REQUIRED = ("name", "input", "output", "model", "cron")
OPTIONAL = {"pretrained": None, "queue": DEFAULT_QUEUE, "embeddings": True, "batch_size": None,
            "input_format": "auto", "image_col": None, "caption_col": None, "key_col": None, "samples_per_shard": None,
            "kind": "score", "modality": "pairs"}
INPUT_FIELDS = ("input_format", "image_col", "caption_col", "key_col", "samples_per_shard", "modality")


class ScheduleError(SpecError):
    """A schedule file a user got wrong; the message names the dataset and field."""

    def __init__(self, where: str, message: str) -> None:
        ValueError.__init__(self, f"{where}: {message}")
        self.field = where


def cron_fields(expr: str) -> dict[str, str]:
    """'m h dom mon dow' -> the keyword arguments of celery.schedules.crontab."""
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(f"{expr!r} is not a 5-field cron expression (minute hour day-of-month month day-of-week)")
    keys = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
    return dict(zip(keys, parts))


def dataset_spec(dataset: dict[str, Any]) -> JobSpec:
    """The score (or embed) job a dataset entry stands for."""
    return JobSpec(dataset["input"], dataset["output"], ModelSpec(dataset["model"], dataset["pretrained"]),
                   batch_size=dataset["batch_size"], queue=dataset["queue"], kind=dataset["kind"],
                   embeddings=dataset["embeddings"], **{k: dataset[k] for k in INPUT_FIELDS})


def load_schedule(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a schedule file; every problem names the file, the dataset and the field."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScheduleError(str(path), f"cannot read TOML ({exc})") from None
    entries = data.get("dataset")
    if not isinstance(entries, list) or not entries:
        raise ScheduleError(str(path), "no [[dataset]] entries")
    datasets, names = [], set()
    for n, entry in enumerate(entries):
        where = f"{path}: dataset {entry.get('name', f'#{n + 1}')!s}"
        missing = [k for k in REQUIRED if not entry.get(k)]
        unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            raise ScheduleError(where, f"missing {', '.join(missing)}" if missing else f"unknown field {unknown[0]}")
        dataset = {**OPTIONAL, **entry}
        if dataset["name"] in names:
            raise ScheduleError(where, "name is used twice")
        names.add(dataset["name"])
        try:
            crontab(**cron_fields(dataset["cron"]))
            dataset_spec(dataset).validate()
        except SpecError as exc:
            raise ScheduleError(where, str(exc)) from None
        except ValueError as exc:
            raise ScheduleError(f"{where}: cron", str(exc)) from None
        datasets.append(dataset)
    return datasets
