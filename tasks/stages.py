"""The workers' side of the stage engine (core/stages.py): each job kind's stages, settled as its
tasks end. Nothing else on the worker side publishes a job's tasks."""
from __future__ import annotations

import logging
from typing import Any

from clipbatch.core.curation import load_plan
from clipbatch.core.curation_stages import CurationStages
from clipbatch.core.feed import Entry
from clipbatch.core.jobs import JobStore
from clipbatch.core.specs import FinetuneSpec, ShardSpec
from clipbatch.core.stages import Engine, OneStage, StagePlan, Steps
from clipbatch.core.storage import open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.context import SETTINGS, check_entry

log = logging.getLogger("clipbatch.stages")


def engine(jobs: JobStore) -> Engine:
    return Engine(jobs.r, jobs.ttl_s, app, SETTINGS.queue_window)


def plan_of(shard: ShardSpec) -> StagePlan:
    """The stages of ``shard``'s job: one for embed and score, a step each for a fine-tune, and a
    curation job's from its saved plan."""
    spec = shard.job
    if isinstance(spec, FinetuneSpec):
        return Steps(spec.shards, spec.steps)
    if spec.kind == "shards":
        return CurationStages(load_plan(open_storage(spec.output)), spec.output)
    return OneStage()


def settle(jobs: JobStore, shard: ShardSpec, given_up: bool = False) -> None:
    """Task ``shard`` is committed (or given up on): move its job past its stage if it was the stage's
    last, then keep the queue window full, with entries that verify (signing on). Before the task is
    counted."""
    engine_, plan = engine(jobs), plan_of(shard)

    def check(entry: Entry) -> None:
        check_entry(jobs, shard.job_id, entry)

    def refused(entry: Entry | None, why: Exception) -> None:
        refuse(jobs, [shard.job_id, *(entry or ())], why)

    outcome = engine_.settle(shard.job_id, shard.job.kind, shard.job.queue, shard.index, plan, given_up, check,
                             refused)
    stage = plan.stage_of(shard.index)
    if outcome == "ended":
        problem = (f"stage {stage.name} did not complete: a task was given up on (see its failure), so the stages "
                   "after it did not run; fix the cause and resubmit with the same --output: committed tasks are "
                   "skipped")
        log.error("job ended at a stage job=%s stage=%s", shard.job_id, stage.name)
        jobs.set_problem(shard.job_id, problem)
    elif outcome == "launched":
        log.info("stage launched job=%s after=%s", shard.job_id, stage.name)
    engine_.successor(shard.job_id, shard.job.kind, shard.job.queue, shard.index, check, refused)


def refuse(jobs: JobStore, args: list[Any], why: Exception) -> dict[str, Any]:
    """A message or entry no trusted key vouches for: logged and dead-lettered, never run, no job changed."""
    job_id, index, uri = (list(args) + [None] * 3)[:3]
    log.error("shard refused job=%s shard=%s input=%s reason=%s", job_id, index, uri, why)
    jobs.record_refused(job_id, index, uri, f"refused, not run: {why}")
    return {"outcome": "refused", "reason": str(why)}
