"""Watch a job until it ends, or a submit while it enqueues: a live rich progress bar for people,
plain polling otherwise."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clipbatch.core.keys import JobState

if TYPE_CHECKING:
    from clipbatch.orchestration.client import Client, Job

POLL_S = 0.5


def _describe(status: dict[str, Any]) -> str:
    failed = f", {status['shards_failed']} shards failed" if status["shards_failed"] else ""
    return (
        f"{status['state']}: {status['samples_done']} samples ({status['samples_failed']} bad){failed}"
    )


def watch(
    job: Job, live: bool, timeout_s: float | None = None, check: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Poll ``job`` until it reaches a terminal state (or ``timeout_s``); return the last status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = job.status()
    columns = (TextColumn("[bold]{task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("shards"), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=Console(file=sys.stderr), disable=not live, transient=False) as bar:
        task = bar.add_task(_describe(status), total=status["shards_total"], job=job.job_id)
        while True:
            done = status["shards_done"] + status["shards_failed"]
            bar.update(task, completed=done, description=_describe(status))
            if JobState(status["state"]).terminal:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job.job_id} still {status['state']} after {timeout_s}s")
            if check is not None:
                check()
            time.sleep(POLL_S)
            status = job.status()


@contextmanager
def submitting(client: Client, live: bool) -> Iterator[None]:
    """Draw a bar on stderr while ``client`` enqueues a job (planned shards -> broker and pending list)."""
    columns = (TextColumn("submitting"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), disable=not live, transient=True) as bar:
        task = bar.add_task("submit", total=None)
        client.progress = lambda done, total: bar.update(task, completed=done, total=total)
        try:
            yield
        finally:
            client.progress = None
