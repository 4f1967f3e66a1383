"""The write stage of a curation job (core/curation.py): write one open_clip-ready tar, commit, report.

The tar's rows come from the scored shards its write plan names; their commits are checked against
the plan's pins before and after the reads (core/pins.py)."""
from __future__ import annotations

import json
from typing import Any

from clipbatch.core import layout
from clipbatch.core.broker import TRAIN_SHARD
from clipbatch.core.curation import parse_input
from clipbatch.core.pins import check_pins
from clipbatch.core.specs import ShardSpec
from clipbatch.core.storage import open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.lifecycle import ShardTask, run_message
from clipbatch.core.results import ShardResult
from clipbatch.workers.training_shards import write_train_shard


def pinned_write(shard: ShardSpec, attempt: str) -> ShardResult:
    output_uri, _, j = parse_input(shard.input)
    output = open_storage(output_uri)
    plan = json.loads(output.read(layout.write_plan(j)))
    parts = [entry["part"] for entry in plan["parts"]]
    check_pins(output, plan["scored"], parts)
    result = write_train_shard(shard, attempt)
    check_pins(output, plan["scored"], parts)
    return result


@app.task(name=TRAIN_SHARD, base=ShardTask, bind=True)
def train_shard(self: ShardTask, *message: Any) -> dict[str, Any]:
    return run_message(list(message), pinned_write)
