"""The ``clipbatch`` command: the producer's group plus the worker side's commands.

The one module that joins both sides. Worker-side commands are named here and imported only
when invoked or listed (click's lazy-loading pattern), so ``clipbatch submit`` on a small
producer box never loads torch, Celery's task modules or the compute.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from clipbatch.orchestration.cli import main as producer

# command name -> "module:attribute", loaded on first use
LAZY_COMMANDS = {
    "worker": "clipbatch.tasks.cli:worker",
    "make-checkpoint": "clipbatch.tasks.cli:make_checkpoint",
}


class LazyGroup(type(producer)):  # type: ignore[misc]
    """The producer's group (its error handling included) with commands resolved by name."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, _, attr = LAZY_COMMANDS[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


main: Any = LazyGroup(name="clipbatch", commands=dict(producer.commands), callback=producer.callback,
                      params=producer.params, help=producer.help)


@main.command()
@click.option("--workdir", default="demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--shards", type=int, default=4, show_default=True)
@click.option("--samples-per-shard", type=int, default=64, show_default=True)
def demo(workdir: str, shards: int, samples_per_shard: int) -> None:
    """Build shards from real photos, embed them on the embedded default, print a summary."""
    from clipbatch.demo import run_demo

    run_demo(Path(workdir), shards, samples_per_shard)

if __name__ == "__main__":
    main()
