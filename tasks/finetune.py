"""The fine-tuning step task: train one shard, commit the next checkpoint, enqueue the next step."""
from __future__ import annotations

from typing import Any, cast

from clipbatch.core.jobs import JobStore
from clipbatch.core.broker import FINETUNE_STEP
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.core.specs import FinetuneSpec, ShardSpec
from clipbatch.workers.finetune import train_step


def enqueue_next(jobs: JobStore, shard: ShardSpec, marker: dict[str, Any]) -> None:
    """Publish the live step and loss, then the next step's message (harmless if sent twice)."""
    spec = cast(FinetuneSpec, shard.job)  # the message of a fine-tune step
    jobs.set_progress(shard.job_id, marker["step"], marker["loss"])
    following = shard.index + 1
    if following < spec.steps:
        message = ShardSpec(shard.job_id, following, spec.shards[following % len(spec.shards)], spec).message()
        app.send_task(FINETUNE_STEP, args=message, queue=spec.queue)


@app.task(name=FINETUNE_STEP, base=ShardTask, bind=True)
def finetune_step(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), train_step, after_commit=enqueue_next)
