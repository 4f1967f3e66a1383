"""The curation stage task (clusters, assign, dedup, boundary): each runs the usual shard life cycle
(tasks/lifecycle.py: skip if committed, compute, commit at its global index, settle with the stage
engine, count once). The engine (tasks/stages.py) launches the next stage when a stage is complete.

A stage that reads the scored output checks the commits its plan pinned before and after its reads
(core/pins.py), so a rescore of the scored output while the job runs fails the task, naming the shard.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from threadpoolctl import threadpool_limits

from clipbatch.core.broker import CURATE_STAGE, TRAIN_SHARD
from clipbatch.core.curation import CurationPlan, load_parts, load_plan, parse_input
from clipbatch.core.pins import check_pins
from clipbatch.core.results import Files, ShardResult
from clipbatch.core.specs import ShardSpec
from clipbatch.core.storage import Storage, open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.workers.boundary import boundary_pass
from clipbatch.workers.curation import assign_part, dedup_group, train_centroids
from clipbatch.workers.runtime import available_cpus

log = logging.getLogger("clipbatch.curation")

def _clusters(plan: CurationPlan, output: Storage, n: int) -> tuple[Files, dict[str, Any]]:
    return train_centroids(plan, output)


def _assign(plan: CurationPlan, output: Storage, n: int) -> tuple[Files, dict[str, Any]]:
    return assign_part(plan, output, load_parts(output)[n])


def _every_part(plan: CurationPlan, output: Storage, n: int) -> list[int]:
    return load_parts(output)


def _its_part(plan: CurationPlan, output: Storage, n: int) -> list[int]:
    return [load_parts(output)[n]]


def _no_part(plan: CurationPlan, output: Storage, n: int) -> list[int]:
    return []


# stage -> (its compute, the scored shards it reads, checked against the plan's pins)
STAGES: dict[str, tuple[Callable[..., tuple[Files, dict[str, Any]]], Callable[..., list[int]]]] = {
    "clusters": (_clusters, _every_part),
    "assign": (_assign, _its_part),
    "dedup": (dedup_group, _no_part),
    "boundary": (boundary_pass, _no_part),
}


def stage_threads() -> int:
    """The threads a stage's faiss and BLAS get: this machine's CPUs shared by the worker's processes
    (CLIPBATCH_WORKER_PROCESSES, set by ``clipbatch worker --concurrency``). Each library would otherwise
    start one per core in every process: measured at 10^7 pairs, the assign stage took 321 s with two
    processes on two cores against 279 s with one. The stages' bytes do not depend on the count (tested)."""
    return max(1, available_cpus() // max(1, int(os.environ.get("CLIPBATCH_WORKER_PROCESSES") or 1)))


def compute_stage(shard: ShardSpec, attempt: str) -> ShardResult:
    """One stage task's files and marker record (no samples: only the write stage counts pairs)."""
    output_uri, stage, n = parse_input(shard.input)
    if stage not in STAGES:
        raise ValueError(f"{shard.input}: the write stage runs as {TRAIN_SHARD}")
    compute, reads = STAGES[stage]
    output = open_storage(output_uri)
    plan = load_plan(output)
    parts = reads(plan, output, n)
    check_pins(output, plan.scored, parts)
    # the clusters task is alone in its stage: nothing else of the job runs beside it
    with threadpool_limits(limits=available_cpus() if stage == "clusters" else stage_threads()):
        files, record = compute(plan, output, n)
    check_pins(output, plan.scored, parts)
    return ShardResult(files, 0, 0, 0, "", record={"stage": stage, **record})


@app.task(name=CURATE_STAGE, base=ShardTask, bind=True)
def curate_stage(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), compute_stage)
