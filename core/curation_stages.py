"""A curation job's stages as the stage engine sees them (core/stages.py).

The stages' tasks and indices are those of the plan (core/curation.py). The write stage's size is
learnt when it is launched, from the dedup and boundary markers, so its launch grows the job's total.
"""
from __future__ import annotations

from dataclasses import dataclass

from clipbatch.core import commit
from clipbatch.core.curation import CurationPlan, plan_write, stage_tasks
from clipbatch.core.stages import NextStage, Stage
from clipbatch.core.storage import open_storage


@dataclass(frozen=True)
class CurationStages:
    """clusters, assign, dedup, boundary (when it has tasks), write: the engine's StagePlan."""

    plan: CurationPlan
    output: str

    def stage_of(self, index: int) -> Stage:
        name = self.plan.stage_of(index)
        if name == "write":
            return Stage(name, self.plan.base(name), 0, last=True)
        return Stage(name, self.plan.base(name), self.plan.size(name) or 0)

    def next_stage(self, stage: Stage) -> NextStage | None:
        name = self.plan.next_stage(stage.name)
        if name != "write":
            return NextStage(name, [(i, uri, None) for i, uri in stage_tasks(self.plan, self.output, name)])
        output = open_storage(self.output)
        tars = plan_write(output, self.plan, commit.list_markers(output))
        return NextStage(name, [(i, uri, None) for i, uri in stage_tasks(self.plan, self.output, name, tars)], tars)
