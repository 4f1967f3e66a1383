"""The fine-tuning step task: train one shard and commit the next checkpoint; the stage engine
(tasks/stages.py) launches the next step once this one is committed."""
from __future__ import annotations

from typing import Any

from clipbatch.core.broker import FINETUNE_STEP
from clipbatch.core.jobs import JobStore
from clipbatch.core.specs import ShardSpec
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.workers.finetune import train_step


def show_step(jobs: JobStore, shard: ShardSpec, marker: dict[str, Any]) -> None:
    """Publish the live step and loss (``status`` shows them)."""
    jobs.set_progress(shard.job_id, marker["step"], marker["loss"])


@app.task(name=FINETUNE_STEP, base=ShardTask, bind=True)
def finetune_step(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), train_step, after_commit=show_step)
