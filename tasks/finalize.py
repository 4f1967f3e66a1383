"""Ending a job, once, on the worker side: ``_job.json`` and the kind's report go to the output.

Whoever accounts for the last shard finalises inline; a job with nothing to run, or one whose
last shard was dead-lettered, gets a ``FINALIZE_JOB`` message instead. Both paths take a
Redis lease first, so two processes never write the same job's files at once; a finaliser
that dies mid-way leaves its message unacked, and the redelivery (after the visibility
timeout, by which time the lease has lapsed) finishes the job. ``status`` never writes.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from clipbatch.core import layout
from clipbatch.core.broker import FINALIZE_JOB
from clipbatch.core.jobs import JobStore
from clipbatch.core.keys import JobState
from clipbatch.core.report import build_report, finish_finetune
from clipbatch.core.selection import finish_train_shards
from clipbatch.core.storage import open_storage
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
    final = JobState.FAILED if status["shards_failed"] else JobState.SUCCEEDED
    record = {"spec": jobs.spec(job_id), **status, "state": final.value, "finished_at": time.time()}
    storage = open_storage(status["output"])
    storage.write(layout.JOB_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    if status["kind"] == "shards":
        finish_train_shards(storage)
    elif status["kind"] == "finetune":
        finish_finetune(storage, record)
    else:
        build_report(storage, record)
    jobs.set_state(job_id, final)
    log.info("job finalized job=%s state=%s", job_id, final.value)
    return jobs.get(job_id)


@app.task(name=FINALIZE_JOB)
def finalize_job(job_id: str) -> str | None:
    status = finalize(job_store(), job_id)
    return None if status is None else status["state"]
