"""The worker side's commands, added to ``clipbatch`` by ``clipbatch.cli`` and loaded only when run."""
from __future__ import annotations

import os

import click

from clipbatch.core.specs import SpecError


@click.command()
@click.option("--queues", default="gpu", show_default=True, help="Comma-separated queues to consume.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Processes; one per device.")
@click.option("--loglevel", default="info", show_default=True)
@click.option("--hostname", help="Celery node name (default clipbatch-<pid>@<host>).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="CLIPBATCH_METRICS_PORT",
              help="Serve Prometheus metrics on this port (env CLIPBATCH_METRICS_PORT; 0 or unset: off).")
def worker(queues: str, device: str, concurrency: int, loglevel: str, hostname: str | None,
           metrics_port: int | None) -> None:
    """Run a Celery worker that processes shard messages."""
    if concurrency < 1:
        raise SpecError("concurrency", "must be at least 1")
    os.environ["CLIPBATCH_DEVICE"] = device
    os.environ["CLIPBATCH_WORKER_PROCESSES"] = str(concurrency)  # they share the CPUs (tasks/curation.py)
    if metrics_port:
        from clipbatch.tasks.metrics import start as start_metrics

        try:
            start_metrics(metrics_port)
        except OSError as exc:
            raise SpecError("metrics_port", f"cannot listen on {metrics_port} ({exc.strerror})") from None
    from clipbatch.tasks.app import app

    node = hostname or f"clipbatch-{os.getpid()}@%h"
    # No gossip: every worker would receive every other worker's heartbeats, N^2 pub/sub traffic
    # in Redis (docs/scaling.md). No mingle: nothing to sync at start (cancel is a job flag, not a revoke).
    app.worker_main(["worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork",
                     "--loglevel", loglevel, "--hostname", node, "-O", "fair", "--without-gossip", "--without-mingle"])


@click.command("make-checkpoint")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--model", default="clipbatch-tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_checkpoint(path: str, model: str, seed: int) -> None:
    """Save a seeded random checkpoint of MODEL (for tests and demos; no download)."""
    from clipbatch.workers.models import save_seeded_checkpoint

    click.echo(save_seeded_checkpoint(model, path, seed))
