"""The life of one shard message, the same for every kind of shard task.

decode (look the job's spec up by id; with signing on, refuse a spec or entry no trusted key vouches
for) -> skip if the job was cancelled -> skip (and finish the move) if the marker exists -> compute ->
commit (conditional marker; the job is checked again after the compute and after the upload, and a
cancelled job's attempt deletes what it staged) -> settle it with the stage engine (tasks/stages.py:
the next stage, once, and a successor from the job's pending list, one that verifies) -> count once
in Redis -> finalize if last.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from celery import Task
from celery.utils.dispatch import Signal

from clipbatch.core import commit
from clipbatch.core.broker import FINALIZE_JOB
from clipbatch.core.jobs import JobStore
from clipbatch.core.keys import JobState
from clipbatch.core.results import ShardResult
from clipbatch.core.signing import Refused
from clipbatch.core.specs import ShardSpec, SpecError
from clipbatch.core.storage import PERMANENT_ERRORS, open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.context import SETTINGS, check_entry, job_spec, job_store
from clipbatch.tasks.finalize import finalize, report_committed
from clipbatch.tasks.stages import refuse, settle
from clipbatch.workers.writers import UnreadableOutput

log = logging.getLogger("clipbatch.shard")

# Sent in the worker once a shard's outcome is logged, before it is counted, with ``shard``,
# ``outcome``, ``result`` (the compute's result, None when compute did not run), ``marker`` and
# ``timings`` (the seconds of the log line). Metrics listen here; a failing receiver is only logged.
shard_finished = Signal(name="shard_finished")

Compute = Callable[[ShardSpec, str], ShardResult]  # (shard, attempt id) -> what the attempt produced


class ShardTask(Task):
    """Retries with backoff; a shard that fails every attempt is recorded with its reason."""

    autoretry_for = (Exception,)
    # A missing input, a refused credential, a bad spec, another input's commit at this index or an
    # output its own readers refuse fails the same way every time: no retry.
    dont_autoretry_for = (*PERMANENT_ERRORS, SpecError, commit.IndexConflict, UnreadableOutput)
    retry_backoff = True
    retry_backoff_max = 60
    max_retries = SETTINGS.max_retries

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001 (Celery's signature)
        try:
            shard = decode(job_store(), list(args))
        except Refused as why:  # verified when it ran; its job's record changed since
            refuse(job_store(), list(args), why)
            return
        if shard is None:
            return
        reason = f"{type(exc).__name__}: {exc}"
        log.error("shard failed job=%s shard=%d input=%s reason=%s", shard.job_id, shard.index, shard.input, reason)
        _dead_letter(job_store(), shard, reason)


# The task that runs a shard of each kind of job fed from a pending list (a fine-tune is a chain).
def decode(jobs: JobStore, args: list[Any]) -> ShardSpec | None:
    """A shard message's arguments (``[job_id, index, input, version(, signature)]``, the one wire
    format) -> its ShardSpec, the spec looked up by job id; None when the job's record is gone.
    Refused (never run) for anything else, and, with signing on, unless the spec and the entry verify."""
    if not 4 <= len(args) <= 5 or not isinstance(args[0], str) or not isinstance(args[1], int):
        raise Refused(f"not a shard message [job_id, index, input, version(, signature)]: {str(args)[:300]}")
    spec = job_spec(jobs, args[0])
    if spec is None:
        return None
    check_entry(jobs, args[0], tuple(args[1:]))
    return ShardSpec.from_message(args, spec)


def run_message(args: list[Any], compute: Compute,
                after_commit: Callable[[JobStore, ShardSpec, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one shard message (see :func:`run_shard`); a message of a job Redis no longer knows is dropped,
    one that does not verify (signing on) is refused."""
    try:
        shard = decode(job_store(), args)
    except Refused as why:
        return refuse(job_store(), args, why)
    if shard is None:
        log.info("shard skipped job=%s shard=%s reason=job_unknown", args[0], args[1] if len(args) > 1 else "?")
        return {"outcome": "job_unknown"}
    return run_shard(shard, compute, after_commit)


def _dead_letter(jobs: JobStore, shard: ShardSpec, reason: str) -> None:
    """Record the shard as failed; the job's end, if this was its last shard, goes out as a message
    (``on_failure`` runs after the message is settled, so an inline finalise would have no redelivery)."""
    settle(jobs, shard, given_up=True)
    if jobs.dead_letter(shard.job_id, shard.index, shard.input, reason):
        app.send_task(FINALIZE_JOB, args=[shard.job_id], queue=shard.job.queue)


def _give_up(jobs: JobStore, shard: ShardSpec, deliveries: int) -> dict[str, Any]:
    """A poison shard: started too often without finishing (its worker process died each time)."""
    reason = (f"poison shard: started {deliveries - 1} times without finishing "
              f"(the worker process was lost each time; CLIPBATCH_MAX_DELIVERIES={SETTINGS.max_deliveries})")
    log.error("shard dead-lettered job=%s shard=%d input=%s reason=%s", shard.job_id, shard.index, shard.input, reason)
    _dead_letter(jobs, shard, reason)
    return {"outcome": "dead_lettered", "reason": reason}


def run_shard(
    shard: ShardSpec,
    compute: Compute,
    after_commit: Callable[[JobStore, ShardSpec, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``compute`` for ``shard`` unless it is already committed; count it exactly once.

    ``after_commit`` runs with the winning marker once the shard is committed (by this attempt
    or an earlier one), before the shard is settled and counted (a fine-tune shows its step there).

    The outcome line splits the seconds: ``setup_s`` (start -> compute starts: job record, marker,
    delivery count), ``compute_s`` (the compute call) and ``commit_s`` (compute end -> marker
    written and files in place). Counting the shard (one Redis script) follows the line.
    """
    clock = [time.perf_counter()]
    jobs = job_store()
    status = jobs.get(shard.job_id)
    stopped = _stopped(status)
    if stopped:
        log.info("shard skipped job=%s shard=%d reason=%s", shard.job_id, shard.index, stopped)
        return {"outcome": stopped}
    storage = open_storage(shard.job.output)
    marker = commit.read_marker(storage, shard.index)
    attempt = result = None
    if marker is not None:
        clock += [time.perf_counter()] * 2
        commit.check_input(marker, shard.index, shard.input, (shard.input_etag,))
        if not commit.is_finished(storage, marker):
            commit.finish(storage, marker)
        outcome = "already_committed"
    else:
        deliveries = jobs.count_delivery(shard.job_id, shard.index)
        if deliveries > SETTINGS.max_deliveries:
            return _give_up(jobs, shard, deliveries)
        jobs.set_state(shard.job_id, JobState.RUNNING)
        attempt = uuid.uuid4().hex
        log.info("shard start job=%s shard=%d attempt=%s input=%s", shard.job_id, shard.index, attempt, shard.input)
        clock.append(time.perf_counter())
        result = compute(shard, attempt)
        clock.append(time.perf_counter())
        try:
            _still_live(jobs, shard)  # while computing: the output may be another job's now
            won, marker = commit.commit(storage, shard.index, attempt, result.files, _marker_record(shard, result),
                                        before_marker=lambda: _still_live(jobs, shard))  # and while uploading
        except _Dropped as dropped:
            log.info("shard dropped job=%s shard=%d reason=%s", shard.job_id, shard.index, dropped)
            return {"outcome": str(dropped)}
        commit.check_input(marker, shard.index, shard.input, (shard.input_etag, result.input_etag))
        outcome = "committed" if won else "lost_race"
    clock.append(time.perf_counter())
    timings = _timings(*clock)
    _log_outcome(shard, outcome, attempt, marker, timings)
    shard_finished.send(sender=None, shard=shard, outcome=outcome, result=result, marker=marker, timings=timings)
    if after_commit is not None:
        after_commit(jobs, shard, marker)
    settle(jobs, shard)
    if report_committed(jobs, shard, marker, result, storage):
        finalize(jobs, shard.job_id)
    return {"outcome": outcome, "attempt": attempt, "committed_attempt": marker["attempt"],
            "seconds": timings["seconds"]}


class _Dropped(Exception):
    """The shard's job stopped (the message is ``_stopped``'s reason): its work must not commit."""


def _still_live(jobs: JobStore, shard: ShardSpec) -> None:
    """Raise ``_Dropped`` when the shard's job was cancelled or its record is gone."""
    stopped = _stopped(jobs.get(shard.job_id))
    if stopped:
        raise _Dropped(stopped)


def _stopped(status: dict[str, Any] | None) -> str | None:
    """Why a shard must not run or commit: its job was cancelled or has ended (a submit that died is
    ended ``failed``: core/submits.py), or its record is gone (Redis lost its state, or it expired).
    Either way its output's lease is free, and a job submitted since may have planned the output
    anew: a commit now could put an old input version, or an input the new plan placed elsewhere, at
    this index. A resubmit recomputes what is dropped here."""
    if status is None:
        return "job_unknown"
    if status["state"] == JobState.CANCELLED.value:
        return "cancelled"
    return "job_ended" if JobState(status["state"]).terminal else None


def _marker_record(shard: ShardSpec, result: ShardResult) -> dict[str, Any]:
    """What the marker says of this attempt: the input it read, the counts, the job's identity."""
    return {
        "job_id": shard.job_id,
        "kind": shard.job.kind,
        "input": shard.input,
        "input_size": result.input_size,
        "input_etag": result.input_etag,
        "samples_ok": result.samples_ok,
        "samples_failed": result.samples_failed,
        "committed_at": time.time(),
        **shard.job.marker_fields(),
        **result.record,
    }


def _timings(start: float, compute_start: float, compute_end: float, end: float) -> dict[str, float]:
    return {"seconds": end - start, "setup_s": compute_start - start, "compute_s": compute_end - compute_start,
            "commit_s": end - compute_end}


def _log_outcome(shard: ShardSpec, outcome: str, attempt: str | None, marker: dict[str, Any],
                 timings: dict[str, float]) -> None:
    """Logged before the job is counted: once the last shard is counted the job is seen as done."""
    log.info(
        "shard %s job=%s shard=%d attempt=%s committed_attempt=%s samples=%d failed=%d seconds=%.2f setup_s=%.3f "
        "compute_s=%.3f commit_s=%.3f",
        outcome, shard.job_id, shard.index, attempt, marker["attempt"], marker["samples_ok"], marker["samples_failed"],
        timings["seconds"], timings["setup_s"], timings["compute_s"], timings["commit_s"],
    )
