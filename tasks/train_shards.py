"""The training-shard task: write one curated open_clip-ready shard, commit, report."""
from __future__ import annotations

from typing import Any

from tasks.app import TRAIN_SHARD, app
from tasks.shard import ShardTask, run_shard
from tasks.specs import ShardSpec
from workers.train_shards import write_train_shard


@app.task(name=TRAIN_SHARD, base=ShardTask, bind=True)
def train_shard(self: ShardTask, message: dict[str, Any]) -> dict[str, Any]:
    return run_shard(ShardSpec.from_dict(message), write_train_shard)
