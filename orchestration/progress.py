"""Watch a job until it ends, or a submit while it enqueues: a live rich bar on a terminal, and
where no one watches one (CI logs, ``kubectl logs``, cron) a plain line every few seconds.

A rich bar written to a file or a pipe renders once, at the width rich guesses, and comes out
truncated (``━━━ 1… shards 0:… 0…``); a plain line says the same in words a log keeps.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clipbatch.core.keys import JobState

if TYPE_CHECKING:
    from clipbatch.orchestration.client import Client, Job

POLL_S = 0.5
LINE_EVERY_S = 5.0  # between plain progress lines (CLIPBATCH_PROGRESS_EVERY_S)


def line_every_s() -> float:
    """Seconds between plain progress lines: CLIPBATCH_PROGRESS_EVERY_S, else LINE_EVERY_S.

    A value that is not a positive number is named in one line on stderr and the default is used:
    how often progress is shown is not worth failing a wait over.
    """
    raw = os.environ.get("CLIPBATCH_PROGRESS_EVERY_S")
    if not raw:
        return LINE_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        print(f"warning: CLIPBATCH_PROGRESS_EVERY_S={raw!r} is not a positive number of seconds; "
              f"using {LINE_EVERY_S:g}", file=sys.stderr)
        return LINE_EVERY_S
    return value


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal someone watches (a bar redraws there; elsewhere it cannot)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _describe(status: dict[str, Any]) -> str:
    failed = f", {status['shards_failed']} shards failed" if status["shards_failed"] else ""
    return (
        f"{status['state']}: {status['samples_done']} samples ({status['samples_failed']} bad){failed}"
    )


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


@dataclass
class PlainLines:
    """Progress as one self-contained line every ``every_s`` seconds (and at the start and the end).

    The rate counts the samples this watch saw finish; the ETA divides the shards left by the shard
    rate this watch saw (unknown until a shard finishes while watching).
    """

    stream: TextIO
    every_s: float
    start: float = field(default_factory=time.monotonic)
    first: dict[str, Any] | None = None
    last_line: float | None = None

    def update(self, status: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = status
        if force or self.last_line is None or now - self.last_line >= self.every_s:
            self.last_line = now
            print(self.line(status, now - self.start), file=self.stream, flush=True)

    def line(self, status: dict[str, Any], elapsed: float) -> str:
        first = self.first or status
        done = status["shards_done"] + status["shards_failed"]
        total = status["shards_total"]
        samples = status["samples_done"] + status["samples_failed"]
        rate = (samples - first["samples_done"] - first["samples_failed"]) / elapsed if elapsed > 0 else 0.0
        seen = done - first["shards_done"] - first["shards_failed"]
        if JobState(status["state"]).terminal or done >= total:
            eta = "0:00:00"
        else:
            eta = _clock((total - done) * elapsed / seen) if seen > 0 and elapsed > 0 else "unknown"
        percent = f" ({done / total:.0%})" if total else ""
        failed = f", {status['shards_failed']} failed" if status["shards_failed"] else ""
        return (f"[{_clock(elapsed)}] job {status['job_id']} {status['state']}: shards {done}/{total}{percent}{failed}, "
                f"samples {status['samples_done']} ({status['samples_failed']} bad), {rate:.1f} samples/s, ETA {eta}")


def _poll(job: Job, status: dict[str, Any], show: Callable[[dict[str, Any]], None], deadline: float | None,
          timeout_s: float | None, check: Callable[[], None] | None) -> dict[str, Any]:
    """Show ``status`` and poll until the job ends; the last status."""
    while True:
        show(status)
        if JobState(status["state"]).terminal:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {status['state']} after {timeout_s}s")
        if check is not None:
            check()
        time.sleep(POLL_S)
        status = job.status()


def watch(
    job: Job, live: bool, timeout_s: float | None = None, check: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Poll ``job`` until it reaches a terminal state (or ``timeout_s``); return the last status.

    With ``live``: a bar on stderr when it is a terminal, plain lines on it otherwise.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = job.status()
    if live and not is_terminal(sys.stderr):
        lines = PlainLines(sys.stderr, line_every_s())
        return _poll(job, status, lambda s: lines.update(s, force=JobState(s["state"]).terminal), deadline,
                     timeout_s, check)
    columns = (TextColumn("[bold]{task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("shards"), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=Console(file=sys.stderr), disable=not live, transient=False) as bar:
        task = bar.add_task(_describe(status), total=status["shards_total"], job=job.job_id)

        def show(s: dict[str, Any]) -> None:
            bar.update(task, completed=s["shards_done"] + s["shards_failed"], description=_describe(s))

        return _poll(job, status, show, deadline, timeout_s, check)


@contextmanager
def submitting(client: Client, live: bool) -> Iterator[None]:
    """Show a submit enqueueing a job (planned shards -> broker and pending list) on stderr: a bar on a
    terminal, else a plain line every few seconds and one when all are enqueued."""
    if not live:
        yield
        return
    if not is_terminal(sys.stderr):
        every, last = line_every_s(), [None]

        def line(done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or last[0] is None or now - last[0] >= every:
                last[0] = now
                print(f"submitting: {done}/{total} shards enqueued", file=sys.stderr, flush=True)

        with _reporting(client, line):
            yield
        return
    columns = (TextColumn("submitting"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("submit", total=None)
        with _reporting(client, lambda done, total: bar.update(task, completed=done, total=total)):
            yield


@contextmanager
def _reporting(client: Client, progress: Callable[[int, int], None]) -> Iterator[None]:
    client.progress = progress
    try:
        yield
    finally:
        client.progress = None
