"""The embed task: decode the message, embed the shard on this worker, commit, report."""
from __future__ import annotations

from typing import Any

from tasks.app import EMBED_SHARD, app
from tasks.shard import ShardTask, run_shard
from tasks.specs import ShardSpec
from workers.embed import embed_shard as compute_embeddings


@app.task(name=EMBED_SHARD, base=ShardTask, bind=True)
def embed_shard(self: ShardTask, message: dict[str, Any]) -> dict[str, Any]:
    return run_shard(ShardSpec.from_dict(message), compute_embeddings)
