"""Write one curated training shard: the selected pairs' original bytes, open_clip-ready."""
from __future__ import annotations

import io
import json
from collections import defaultdict

import pyarrow.parquet as pq

from clipbatch.core import layout
from clipbatch.core.storage import open_storage, split
from clipbatch.core.specs import ShardSpec
from clipbatch.workers.embed import ShardResult
from clipbatch.workers.samples import CAPTION_EXT, IMAGE_EXTS, iter_raw_samples
from clipbatch.workers.writers import write_tar


def write_train_shard(shard: ShardSpec, attempt: str) -> ShardResult:
    """Read the selection, stream each source tar once, write ``{index:05d}.tar`` in selection order."""
    parent, name = split(shard.input)
    storage = open_storage(parent)
    info = storage.info(name)
    if info is None:
        raise FileNotFoundError(f"selection {shard.input} does not exist")
    selected = pq.read_table(io.BytesIO(storage.read(name))).to_pylist()
    wanted: dict[str, set[str]] = defaultdict(set)
    for row in selected:
        wanted[row["shard"]].add(row["key"])
    found: dict[tuple[str, str], dict[str, bytes]] = {}
    for source_uri in sorted(wanted):
        source_parent, source_name = split(source_uri)
        with open_storage(source_parent).open_read(source_name) as stream:
            for raw in iter_raw_samples(stream):
                if raw.key in wanted[source_uri]:
                    found[(source_uri, raw.key)] = raw.members
    samples = []
    for n, row in enumerate(selected):
        members = found.get((row["shard"], row["key"]))
        if members is None:
            raise FileNotFoundError(f"sample {row['key']} is no longer in {row['shard']}")
        image_ext = next(e for e in IMAGE_EXTS if e in members)
        meta = {"key": row["key"], "source_shard": row["shard"], "clip_score": row["clip_score"]}
        samples.append((f"{shard.index:05d}{n:06d}", {image_ext: members[image_ext], CAPTION_EXT: members[CAPTION_EXT],
                                                     "json": json.dumps(meta, sort_keys=True).encode()}))
    buf = io.BytesIO()
    count = write_tar(buf, samples)
    return ShardResult({layout.training_shard(shard.index): buf.getvalue()}, count, 0, info.size, info.etag)
