"""The curation stage task (clusters, assign, dedup, boundary) and the chain between stages.

Each stage task runs the usual shard life cycle (tasks/lifecycle.py: skip if committed, compute,
commit at its global index, count once). Before it is counted, its ``after_commit`` records it
in its stage's set; the task that finds its stage complete launches the next stage, which is
planned from storage alone. A redelivered completing task launches again: the same messages,
which the commit protocol absorbs, and the write stage's tars join the job's total once.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

from threadpoolctl import threadpool_limits

from clipbatch.core import feed
from clipbatch.core.broker import CURATE_STAGE, TRAIN_SHARD
from clipbatch.core.commit import list_markers
from clipbatch.core.curation import CurationPlan, load_parts, load_plan, parse_input, plan_write, stage_tasks
from clipbatch.core.curation_state import StageCounts
from clipbatch.core.jobs import JobStore
from clipbatch.core.results import ShardResult
from clipbatch.core.specs import ShardSpec
from clipbatch.core.storage import open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.context import SETTINGS
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.workers.boundary import boundary_pass
from clipbatch.workers.curation import assign_part, dedup_group, train_centroids
from clipbatch.workers.runtime import available_cpus

log = logging.getLogger("clipbatch.curation")


def stage_threads() -> int:
    """The threads a stage's faiss and BLAS get: this machine's CPUs shared by the worker's processes
    (CLIPBATCH_WORKER_PROCESSES, set by ``clipbatch worker --concurrency``). Each library would otherwise
    start one per core in every process: measured at 10^7 pairs, the assign stage took 321 s with two
    processes on two cores against 279 s with one. The stages' bytes do not depend on the count (tested)."""
    return max(1, available_cpus() // max(1, int(os.environ.get("CLIPBATCH_WORKER_PROCESSES") or 1)))


def compute_stage(shard: ShardSpec, attempt: str) -> ShardResult:
    """One stage task's files and marker record (no samples: only the write stage counts pairs)."""
    alone = parse_input(shard.input)[1] == "clusters"  # the one task of its stage: nothing else of the job runs
    with threadpool_limits(limits=available_cpus() if alone else stage_threads()):
        return _compute_stage(shard)


def _compute_stage(shard: ShardSpec) -> ShardResult:
    output_uri, stage, n = parse_input(shard.input)
    output = open_storage(output_uri)
    plan = load_plan(output)
    if stage == "clusters":
        files, record = train_centroids(plan, output)
    elif stage == "assign":
        files, record = assign_part(plan, output, load_parts(output)[n])
    elif stage == "dedup":
        files, record = dedup_group(plan, output, n)
    elif stage == "boundary":
        files, record = boundary_pass(plan, output, n)
    else:
        raise ValueError(f"{shard.input}: the write stage runs as {TRAIN_SHARD}")
    return ShardResult(files, 0, 0, 0, "", record={"stage": stage, **record})


def launch(jobs: JobStore, job_id: str, queue: str, plan: CurationPlan, output_uri: str, stage: str) -> None:
    """Enqueue every task of ``stage`` through the job's queue window (core/feed.py: the first
    CLIPBATCH_QUEUE_WINDOW to the broker, the rest drawn by finishing tasks); idempotent but for
    duplicate messages."""
    if stage == "write":
        output = open_storage(output_uri)
        tars = plan_write(output, plan, list_markers(output))
        StageCounts(jobs.r, jobs.ttl_s).add_write(job_id, tars)
        entries = stage_tasks(plan, output_uri, "write", tars)
    else:
        entries = stage_tasks(plan, output_uri, stage)
    log.info("curation stage launched job=%s stage=%s tasks=%d", job_id, stage, len(entries))
    # The completing task publishes one successor after this: its own slot of the window.
    feed.publish(app, feed.Feed(jobs.r, jobs.ttl_s), job_id, queue, [(i, uri, None) for i, uri in entries],
                 max(0, SETTINGS.queue_window - 1), partial(feed.task_of, "shards"))


def chain(jobs: JobStore, shard: ShardSpec, marker: dict[str, Any]) -> None:
    """After the commit, before the count: launch the next stage if this task completed its own."""
    output_uri, stage, _ = parse_input(shard.input)
    plan = load_plan(open_storage(output_uri))
    done = StageCounts(jobs.r, jobs.ttl_s).committed(shard.job_id, stage, shard.index)
    if done == plan.size(stage):
        launch(jobs, shard.job_id, shard.job.queue, plan, output_uri, plan.next_stage(stage))


@app.task(name=CURATE_STAGE, base=ShardTask, bind=True)
def curate_stage(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), compute_stage, after_commit=chain)
