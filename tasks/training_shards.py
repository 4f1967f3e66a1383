"""The write stage of a curation job (core/curation.py): write one open_clip-ready tar, commit, report."""
from __future__ import annotations

from typing import Any

from clipbatch.core.broker import TRAIN_SHARD
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.workers.training_shards import write_train_shard


@app.task(name=TRAIN_SHARD, base=ShardTask, bind=True)
def train_shard(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), write_train_shard)
