"""The guarantee, checked from storage alone (docs/reliability.md, "The invariant").

Once the jobs on an output end: every input sample appears exactly once in the output (an
embedding row or an error row), each output file holds the input shard its marker names, every
file reads with the readers docs/outputs.md names (numpy, pyarrow), and nothing is left staged.
"""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from clipbatch.core import commit, layout
from clipbatch.core.storage import open_storage


def check_output(output: str, inputs: dict[str, set[str]], embeddings: bool = True) -> dict[str, int]:
    """``inputs``: input shard URI -> the sample keys it holds. Returns counts; raises AssertionError."""
    storage = open_storage(output)
    markers = commit.list_markers(storage)
    present = set(storage.list(""))
    assert not [k for k in present if k.startswith(layout.TMP_DIR + "/")], "staged files left behind"
    by_input = Counter(m["input"] for m in markers.values())
    assert not [u for u, n in by_input.items() if n > 1], f"an input committed at two indices: {by_input}"
    seen: Counter = Counter()
    embedded = 0
    for index, marker in markers.items():
        names = layout.embed_files(index)
        assert set(marker["files"]) <= present, f"shard {index}: files missing {set(marker['files']) - present}"
        assert not set(marker.get("retired", [])) & present, f"shard {index}: retired files still there"
        stale = {n for n in names.values() if n in present} - set(marker["files"])
        assert not stale, f"shard {index}: files its marker does not name: {stale}"
        tables = [pq.read_table(io.BytesIO(storage.read(names[part]))) for part in ("metadata", "errors")
                  if names[part] in present]
        for table in tables:
            assert len(set(table.column_names)) == len(table.column_names), f"shard {index}: duplicate columns"
            assert set(table.column("shard").to_pylist()) <= {marker["input"]}, f"shard {index}: rows of another input"
            seen.update((marker["input"], k) for k in table.column("key").to_pylist())
        rows = tables[0].num_rows if names["metadata"] in present else 0
        assert rows == marker["samples_ok"], f"shard {index}: {rows} metadata rows, marker says {marker['samples_ok']}"
        if embeddings and rows:
            for part in ("img", "text"):
                assert len(np.load(io.BytesIO(storage.read(names[part])))) == rows, f"shard {index}: {part} rows"
        embedded += rows
        assert json.loads(storage.read(names["stats"]))["attempt"] == marker["attempt"], f"shard {index}: stats"
    expected = Counter((uri, k) for uri, keys in inputs.items() for k in keys)
    twice = {k: n for k, n in seen.items() if n > 1}
    lost = set(expected) - set(seen)
    assert not twice, f"samples written twice: {sorted(twice)[:5]}"
    assert not lost, f"samples lost: {sorted(lost)[:5]}"
    assert not set(seen) - set(expected), f"rows of no current input: {sorted(set(seen) - set(expected))[:5]}"
    return {"shards": len(markers), "samples": sum(seen.values()), "embedded": embedded}
