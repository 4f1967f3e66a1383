"""The producer's commands (submit, status, run, report, ...): a thin layer over the Client.

``clipbatch.cli`` adds the worker side's commands (``worker``, ``make-checkpoint``, ``demo``)
to this group, loaded only when one of them runs, so the producer never imports torch.

Exit codes: 0 success, 1 a failed or cancelled job (or an unreachable service), 2 a bad
command or spec. A user's mistake prints one line naming the field, never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import kombu.exceptions
import redis

from clipbatch.core.config import ConfigError, Settings, redact
from clipbatch.core.keys import JobState
from clipbatch.orchestration.cli_options import KIND_HELP, spec_from_options, with_kind_options
from clipbatch.core.specs import (DEFAULT_CLUSTER_SIZE, DEFAULT_SAMPLES_PER_TRAIN_SHARD, FinetuneSpec, ModelSpec,
                                  SpecError, TrainShardsSpec)

EXIT_FAILED = 1
EXIT_USAGE = 2


class UserError(click.ClickException):
    """A mistake in the command or spec: exit 2 with one line."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {redact(self.message)}", err=True)


class ServiceError(click.ClickException):
    """Redis, S3 or a worker misbehaved: exit 1 with one line."""

    exit_code = EXIT_FAILED

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {redact(self.message)}", err=True)


class Group(click.Group):
    """Turns the errors a user can cause into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        from clipbatch.orchestration.client import BrokerUnavailable, UnknownJob
        from clipbatch.orchestration.embedded import EmbeddedError
        from clipbatch.core.storage import StorageError, StorageUnavailable

        try:
            return super().invoke(ctx)
        except (BrokerUnavailable, EmbeddedError, StorageUnavailable) as exc:
            raise ServiceError(str(exc)) from None
        except (SpecError, UnknownJob, StorageError, ConfigError) as exc:
            raise UserError(str(exc).strip("'\"")) from None
        except redis.ConnectionError as exc:
            url = redact(Settings.from_env().broker_url)
            raise ServiceError(f"cannot reach Redis at {url} ({exc}); set CLIPBATCH_BROKER_URL") from None
        except (redis.RedisError, kombu.exceptions.KombuError) as exc:
            raise ServiceError(f"{type(exc).__name__}: {exc}") from None


@click.group(cls=Group)
@click.version_option(package_name="clipbatch")
def main() -> None:
    """Batch CLIP embedding over webdataset shards with Celery workers, Redis and S3."""


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    click.echo(
        f"job {status['job_id']} ({status['kind']}): {status['state']}\n"
        f"  shards  {status['shards_done']}/{status['shards_total']} done, {status['shards_failed']} failed, "
        f"{status['shards_skipped']} already committed\n"
        f"  samples {status['samples_done']} embedded, {status['samples_failed']} recorded as errors\n"
        f"  output  {status['output']}"
    )
    if status.get("problem"):
        click.echo(f"  problem {status['problem']}")
    if "step" in status:
        click.echo(f"  step    {status['step']} (last committed), loss {status['loss']}")
    for index, reason in sorted(status.get("failures", {}).items()):
        click.echo(f"  shard {index} failed: {reason}")


def _exit_for(status: dict[str, Any]) -> None:
    if status["state"] in (JobState.FAILED.value, JobState.CANCELLED.value):
        sys.exit(EXIT_FAILED)


@main.group()
def submit() -> None:
    """Submit a job to the workers through Redis."""


def _submit(spec, wait: bool, as_json: bool) -> None:
    """Submit any job; print its id, or wait and print its final status."""
    from clipbatch.orchestration.client import Client
    from clipbatch.orchestration.progress import submitting

    client = Client()
    with submitting(client, live=not as_json):
        job = client.submit(spec)
    status = job.wait(progress=not as_json) if wait else job.status()
    if as_json or wait:
        _print_status(status, as_json)
    else:
        click.echo(job.job_id)
    _exit_for(status)


def _submit_command(kind: str):
    @click.option("--queue", default="gpu", show_default=True, help="Queue the shard messages go to.")
    @click.option("--wait", is_flag=True, help="Wait for the job to end, with a progress bar.")
    def command(input_, output, model, pretrained, model_config, batch_size, as_json, queue, wait,
                no_embeddings=False, **input_options) -> None:
        spec = spec_from_options(kind, input_, output, model, pretrained, model_config, batch_size, queue,
                                 no_embeddings, **input_options)
        _submit(spec, wait, as_json)

    return with_kind_options(kind, command)


for _kind, _help in KIND_HELP.items():
    submit.command(_kind, help=_help)(_submit_command(_kind))


@submit.command("shards")
@click.option("--scored", required=True, help="Output of a score (or embed) job.")
@click.option("--output", required=True, help="Where the training shards go (folder or s3://bucket/prefix).")
@click.option("--min-score", type=float, help="Keep pairs with clip_score >= this.")
@click.option("--top-fraction", type=float, help="Keep this fraction of pairs, highest scores first.")
@click.option("--dedup-cosine", type=float, help="Drop pairs whose image is this close (cosine) to a kept one "
                                                  "(within k-means clusters; exact for a small selection).")
@click.option("--dedup-exact", is_flag=True, help="Drop pairs whose image bytes equal a kept pair's.")
@click.option("--cluster-size", type=int, default=DEFAULT_CLUSTER_SIZE, show_default=True,
              help="Selected pairs per k-means cluster on average (dedup compares pairs within a cluster); "
                   "a selection this small is deduped exactly.")
@click.option("--clusters-per-task", type=int, help="Clusters per dedup task [default: about 100,000 selected "
                                                    "pairs' worth]; fewer means more, smaller tasks and more files.")
@click.option("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_TRAIN_SHARD, show_default=True)
@click.option("--queue", default="gpu", show_default=True)
@click.option("--wait", is_flag=True, help="Wait for the job to end, with a progress bar.")
@click.option("--json", "as_json", is_flag=True)
def submit_shards(scored, output, min_score, top_fraction, dedup_cosine, dedup_exact, cluster_size, clusters_per_task,
                  samples_per_shard, queue, wait, as_json) -> None:
    """Curate open_clip-ready webdataset shards from a scored output, on the workers (docs/curation.md)."""
    _submit(TrainShardsSpec(scored, output, min_score, top_fraction, dedup_cosine, samples_per_shard, queue,
                            dedup_exact=dedup_exact, cluster_size=cluster_size, clusters_per_task=clusters_per_task),
            wait, as_json)


@submit.command("finetune")
@click.option("--train", required=True, help="Training shards, e.g. 's3://bkt/train/{00000..00099}.tar'.")
@click.option("--output", required=True, help="Where checkpoints, metrics and the report go.")
@click.option("--model", required=True)
@click.option("--pretrained", help="Tag, checkpoint path or s3:// URI to start from.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lock-image", is_flag=True, help="Freeze the image tower.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--queue", default="gpu", show_default=True)
@click.option("--wait", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def submit_finetune(train, output, model, pretrained, epochs, lr, batch_size, lock_image, precision, queue, wait,
                    as_json) -> None:
    """Fine-tune contrastively, one shard per step, each step resuming from the last checkpoint."""
    _submit(FinetuneSpec(train, output, ModelSpec(model, pretrained), epochs, lr, batch_size, lock_image, precision,
                         queue=queue), wait, as_json)


@main.command()
@click.argument("job_id")
@click.option("--watch", is_flag=True, help="Follow the job with a live progress bar until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, watch: bool, as_json: bool) -> None:
    """Show a job's state and counters."""
    from clipbatch.orchestration.client import Client

    job = Client().job(job_id)
    result = job.wait(progress=not as_json) if watch else job.status()
    _print_status(result, as_json)
    _exit_for(result)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: queued shards are skipped, committed outputs stay valid."""
    from clipbatch.orchestration.client import Client

    job = Client().job(job_id)
    moved = job.cancel()
    click.echo(f"job {job_id}: {'cancelled' if moved else 'already ' + job.status()['state']}")


@main.command("jobs")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def list_jobs(limit: int, as_json: bool) -> None:
    """List recent jobs, newest first: id, kind, state, progress, age, output."""
    from clipbatch.orchestration.client import Client

    jobs = Client().list_jobs(limit)
    if as_json:
        click.echo(json.dumps(jobs, indent=2, sort_keys=True))
        return
    click.echo(f"{'JOB':16}  {'KIND':8} {'STATE':10} {'PROGRESS':>18}  {'AGE':>4}  OUTPUT")
    for s in jobs:
        shards = f"{s['shards_done']}/{s['shards_total']} {s['progress']:4.0%}"
        click.echo(f"{s['job_id']:16}  {s['kind']:8} {s['state']:10} {shards:>18}  {_age(s['age_s']):>4}  {s['output']}")


def _age(seconds: float) -> str:
    """How long ago, in its largest whole unit: 42s, 5m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


@main.command("dead-letters")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dead_letters(limit: int, as_json: bool) -> None:
    """List shards that were given up on, newest first, with the reason."""
    from clipbatch.orchestration.client import Client

    records = Client().jobs.dead_letters(limit)
    if as_json:
        click.echo(json.dumps(records, indent=2, sort_keys=True))
        return
    for d in records:
        click.echo(f"{d['job_id']}  shard {d['index']}  {d['input']}\n    {d['reason']}")


@main.group()
def run() -> None:
    """Run a job here with no Redis or S3 to set up (a private Redis and worker)."""


def _run_command(kind: str):
    @click.option("--workers", type=int, default=1, show_default=True, help="Worker processes to start.")
    @click.option("--device", default="auto", show_default=True)
    def command(input_, output, model, pretrained, model_config, batch_size, as_json, workers, device,
                no_embeddings=False, **input_options) -> None:
        from clipbatch.orchestration.embedded import EMBEDDED_QUEUE, run_embedded

        spec = spec_from_options(kind, input_, output, model, pretrained, model_config, batch_size, EMBEDDED_QUEUE,
                                 no_embeddings, **input_options)
        status = run_embedded(spec, workers=workers, device=device, progress=not as_json)
        _print_status(status, as_json)
        _exit_for(status)

    return with_kind_options(kind, command)


for _kind, _help in KIND_HELP.items():
    run.command(_kind, help=_help)(_run_command(_kind))


@main.command()
@click.argument("job_or_output")
@click.option("--json", "as_json", is_flag=True)
def report(job_or_output: str, as_json: bool) -> None:
    """Print the score report of a job (by id) or of an output folder / s3:// prefix."""
    from clipbatch.core.report import SUMMARY, format_summary
    from clipbatch.core.storage import open_storage

    output = job_or_output
    if "/" not in job_or_output and not Path(job_or_output).exists():
        from clipbatch.orchestration.client import Client

        output = Client().job(job_or_output).status()["output"]
    try:
        summary = json.loads(open_storage(output).read(SUMMARY))
    except FileNotFoundError:
        raise UserError(f"{output}: no report yet ({SUMMARY} appears when a job on it ends)") from None
    click.echo(json.dumps(summary, indent=2, sort_keys=True) if as_json else format_summary(summary))


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML schedule file (see orchestration/schedule_file.py or docs/usage.md).")
@click.option("--state-dir", default=".clipbatch-scheduler", show_default=True, type=click.Path(file_okay=False),
              help="Where beat keeps its schedule state.")
def scheduler(config_path: str, state_dir: str) -> None:
    """Submit each dataset's score job at its cron time (Celery beat)."""
    from clipbatch.orchestration.schedule_file import load_schedule
    from clipbatch.orchestration.scheduler import SCHEDULER_QUEUE, make_scheduler_app

    datasets = load_schedule(config_path)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    for d in datasets:
        click.echo(f"scheduled {d['name']}: '{d['cron']}' (UTC) {d['input']} -> {d['output']}")
    app = make_scheduler_app(datasets)
    app.worker_main(["worker", "--beat", "--queues", SCHEDULER_QUEUE, "--pool", "solo", "--loglevel", "info",
                     "--schedule", str(Path(state_dir) / "beat-schedule"), "--hostname", f"clipbatch-scheduler-{os.getpid()}@%h"])
