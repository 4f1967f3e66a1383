"""Ending a job, once, on the worker side: ``_job.json`` and the kind's report go to the output.

Whoever accounts for the last shard finalises inline; a job with nothing to run, or one whose
last shard was dead-lettered, gets a ``FINALIZE_JOB`` message instead. Both paths take a
Redis lease first, so two processes never write the same job's files at once; a finaliser
that dies mid-way leaves its message unacked, and the redelivery (after the visibility
timeout, by which time the lease has lapsed) finishes the job. ``status`` never writes.

An embed or score job in which every sample is an error row ends ``failed`` with a ``problem``
line (how many, the commonest reasons, a hint), not ``succeeded``: it embedded nothing.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from clipbatch.core import commit, layout
from clipbatch.core.broker import FINALIZE_JOB
from clipbatch.core.jobs import JobStore
from clipbatch.core.keys import JobState
from clipbatch.core.leases import OutputLeases
from clipbatch.core.report import build_report, finish_finetune, nothing_embedded
from clipbatch.core.selection import finish_train_shards
from clipbatch.core.storage import Storage, open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.context import SETTINGS, job_store

log = logging.getLogger("clipbatch.finalize")


def finalize(jobs: JobStore, job_id: str) -> dict[str, Any] | None:
    """When every shard is accounted for: write ``_job.json`` and the report, then end the job."""
    status = jobs.get(job_id)
    if status is None or not jobs.is_complete(status) or JobState(status["state"]).terminal:
        return status
    # Shorter than the visibility timeout: a redelivered message can claim what a dead finaliser held.
    if not jobs.claim_finalize(job_id, max(1, SETTINGS.visibility_timeout_s // 2)):
        return status
    storage = open_storage(status["output"])
    markers = commit.list_markers(storage)
    problems = _incomplete(jobs, job_id, storage, markers, status["kind"])
    final = JobState.FAILED if status["shards_failed"] or problems else JobState.SUCCEEDED
    record = {"spec": jobs.spec(job_id), **status, "state": final.value, "finished_at": time.time()}
    record["failures"] = {**record["failures"], **problems}
    if status["kind"] == "shards":
        finish_train_shards(storage)
    elif status["kind"] == "finetune":
        finish_finetune(storage, record)
    else:
        empty = nothing_embedded(status["samples_done"], status["samples_failed"], build_report(storage, record))
        if empty and final is JobState.SUCCEEDED:
            final, record["state"], record["problem"] = JobState.FAILED, JobState.FAILED.value, empty
            jobs.set_problem(job_id, empty)
    storage.write(layout.JOB_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    for index, problem in problems.items():
        jobs.dead_letter(job_id, index, markers.get(index, {}).get("input", ""), problem)
    swept = commit.sweep_orphans(storage, markers, time.time() - SETTINGS.visibility_timeout_s)
    jobs.set_state(job_id, final)
    OutputLeases(jobs.r, jobs.ttl_s).release(status["output"], job_id)
    log.info("job finalized job=%s state=%s incomplete=%d orphans_swept=%d", job_id, final.value, len(problems), swept)
    return jobs.get(job_id)


def _incomplete(jobs: JobStore, job_id: str, storage: Storage, markers: dict[int, dict[str, Any]],
                kind: str) -> dict[int, str]:
    """What storage says is wrong with a job's output: shards counted done whose marker is missing,
    and markers whose files are not all in place. A job with any of these has not succeeded."""
    if kind == "finetune":  # a chain: each step resumes from the last one's checkpoint, checked then
        return {}
    done = jobs.done_indices(job_id)
    problems = {i: "counted as committed, but storage holds no marker" for i in sorted(done - set(markers))}
    for index, names in commit.missing_files(storage, markers).items():
        problems[index] = f"committed, but files are missing: {', '.join(names)}"
    for uri, indices in commit.committed_twice(markers).items():
        for index in indices[1:]:
            problems[index] = f"{uri} is committed at shard {indices[0]} too (a resubmit keeps one)"
    return problems


@app.task(name=FINALIZE_JOB)
def finalize_job(job_id: str) -> str | None:
    status = finalize(job_store(), job_id)
    return None if status is None else status["state"]
