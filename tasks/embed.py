"""The embed task: decode the message, embed the shard on this worker, commit, report; then any
read-ahead shards taken meanwhile (tasks/prefetch.py)."""
from __future__ import annotations

from typing import Any

from clipbatch.core.broker import EMBED_SHARD
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask
from clipbatch.tasks.prefetch import run_chained
from clipbatch.workers.embed import embed_shard as compute_embeddings, warm_input


@app.task(name=EMBED_SHARD, base=ShardTask, bind=True, Request="clipbatch.tasks.prefetch:ShardRequest")
def embed_shard(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_chained(self, list(message), compute_embeddings, warm_input)
