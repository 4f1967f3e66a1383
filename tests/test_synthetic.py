"""The synthetic output (tests/synthetic.py) is what a finished job leaves: the real planner sees
every shard committed and unchanged, and plans exactly the inputs added or rewritten since. The
scale bench measures this fixture, so a broken one must fail here, not skew the curves."""
from __future__ import annotations

import json

import pytest

from clipbatch.core import commit, layout
from clipbatch.core.scores import merge
from clipbatch.core.storage import open_storage
from clipbatch.orchestration.planner import plan
from tests import synthetic

SHARDS = 50


def _roots(where: str, tmp_path, bucket: str | None) -> tuple[str, str]:
    if where == "s3":
        return f"s3://{bucket}/in", f"s3://{bucket}/out"
    return str(tmp_path / "in"), str(tmp_path / "out")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def fixture(request, tmp_path) -> synthetic.Fixture:
    bucket = request.getfixturevalue("bucket") if request.param == "s3" else None
    return synthetic.build(*_roots(request.param, tmp_path, bucket), SHARDS)


def test_a_resubmit_of_the_synthetic_output_has_nothing_to_do(fixture):
    # given a synthetic output of 50 shards; when the real planner plans its job again
    planned = plan(fixture.spec)
    # then every shard is committed, in place, and nothing runs
    assert planned.todo == [] and planned.rescored == []
    assert sorted(planned.committed) == list(range(SHARDS))
    storage = open_storage(fixture.output)
    markers = commit.list_markers(storage)
    assert commit.missing_files(storage, markers) == {}
    assert all(commit.is_finished(storage, m) for m in markers.values())


def test_new_and_rewritten_inputs_are_planned_and_only_they(fixture):
    # given 3 inputs added past the end and input 7 rewritten (another size and ETag)
    synthetic.add_inputs(fixture.input, SHARDS, 3)
    data = synthetic.tar_bytes(7) + b"\0" * 512
    open_storage(fixture.input).write(synthetic.input_name(7), data)
    # when planned
    planned = plan(fixture.spec)
    # then exactly those run, each at its own index
    assert sorted(planned.todo) == [7, SHARDS, SHARDS + 1, SHARDS + 2]
    assert planned.rescored == [7]
    assert len(planned.committed) == SHARDS - 1


def test_stats_hold_real_histograms_and_markers_the_commit_fields(tmp_path):
    fixture = synthetic.build(str(tmp_path / "in"), str(tmp_path / "out"), 3)
    storage = open_storage(fixture.output)
    stats = [json.loads(storage.read(layout.stats(i))) for i in range(3)]
    assert merge(s["clip_score"] for s in stats)["count"] == 3 * synthetic.SAMPLES
    marker = commit.read_marker(storage, 2)
    assert marker["index"] == 2 and marker["fingerprint"] == fixture.spec.fingerprint
    assert marker["input"].endswith(synthetic.input_name(2)) and marker["kind"] == "embed"
    assert set(marker["files"]) == set(layout.embed_files(2).values())
