"""The embed task: decode the message, embed the shard on this worker, commit, report."""
from __future__ import annotations

from typing import Any

from clipbatch.core.broker import EMBED_SHARD
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.workers.embed import embed_shard as compute_embeddings


@app.task(name=EMBED_SHARD, base=ShardTask, bind=True)
def embed_shard(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), compute_embeddings)
