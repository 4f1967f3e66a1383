"""Write one curated training shard: the kept pairs' original bytes, open_clip-ready, in source order.

A kept pair is found in its source tar by key (a key names the first sample under it: the embed stage made
any later one an error row), and its image must hash to the ``image_hash`` the scored output holds for it:
never another sample's bytes under its name."""
from __future__ import annotations

import io
import json
from collections import defaultdict
from typing import Any

import numpy as np

from clipbatch.core import layout
from clipbatch.core.curation import parse_input, read_metadata, read_rows
from clipbatch.core.results import ShardResult
from clipbatch.core.storage import Storage, open_storage, split
from clipbatch.core.specs import ShardSpec
from clipbatch.workers.boundary import apply_changes
from clipbatch.workers.fasttar import iter_selected
from clipbatch.workers.samples import CAPTION_EXT, IMAGE_EXTS, content_hash
from clipbatch.workers.writers import write_tar


def selection(output: Storage, index: int) -> list[dict[str, Any]]:
    """Tar ``index``'s pairs from its write plan: per scored shard, a range of the rows the dedup
    stage kept (merged over its tasks, in row order) as the boundary pass changed them, with key,
    source shard, score and image hash (None in outputs older than the column)."""
    plan = json.loads(output.read(layout.write_plan(index)))
    scored = open_storage(plan["scored"])
    selected = []
    for entry in plan["parts"]:
        part = entry["part"]
        rows = np.sort(np.concatenate([read_rows(output, layout.kept(g, part)) for g in entry["groups"]]))
        rows = apply_changes(rows, [read_rows(output, layout.boundary_changes(b, part)) for b in entry["boundary"]])
        meta = read_metadata(scored, part, ["key", "shard", "clip_score", "image_hash"])
        hashes = meta.get("image_hash") or [None] * len(meta["key"])
        for r in rows[entry["start"]:entry["stop"]].tolist():
            selected.append({"shard": meta["shard"][r], "key": meta["key"][r],
                             "clip_score": float(meta["clip_score"][r]), "image_hash": hashes[r]})
    return selected


def _originals(selected: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, bytes]]:
    """Stream each source tar once; keep the members of the selected samples (the others are skipped)."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for row in selected:
        wanted[row["shard"]].add(row["key"])
    found: dict[tuple[str, str], dict[str, bytes]] = {}
    for source_uri in sorted(wanted):
        source_parent, source_name = split(source_uri)
        source = open_storage(source_parent)
        members = iter_selected(lambda: source.open_read(source_name), wanted[source_uri])
        found.update({(source_uri, key): m for key, m in members.items()})
    return found


def write_train_shard(shard: ShardSpec, attempt: str) -> ShardResult:
    """The write stage: ``{j:05d}.tar`` of tar ``j``'s pairs, original bytes and a json sidecar each."""
    output_uri, _, j = parse_input(shard.input)
    selected = selection(open_storage(output_uri), j)
    found = _originals(selected)
    samples = []
    for n, row in enumerate(selected):
        members = found.get((row["shard"], row["key"]))
        if members is None:
            raise FileNotFoundError(f"sample {row['key']} is no longer in {row['shard']}")
        image_ext = next(e for e in IMAGE_EXTS if e in members)
        if row["image_hash"] not in (None, content_hash(members[image_ext])):
            raise FileNotFoundError(f"sample {row['key']} of {row['shard']} is not the image that was scored (the "
                                    "source changed, or holds the key twice and was scored before a repeated key "
                                    "was made an error row): score it again")
        meta = {"key": row["key"], "source_shard": row["shard"], "clip_score": row["clip_score"]}
        samples.append((f"{j:05d}{n:06d}", {image_ext: members[image_ext], CAPTION_EXT: members[CAPTION_EXT],
                                            "json": json.dumps(meta, sort_keys=True).encode()}))
    buf = io.BytesIO()
    count = write_tar(buf, samples)
    return ShardResult({layout.training_shard(j): buf.getvalue()}, count, 0, 0, "", record={"stage": "write"})
