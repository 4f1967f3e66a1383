"""Planning against an output: stable indices, skips, rescoring of changed inputs."""
from __future__ import annotations

import os

import pytest

from clipbatch.core import commit, layout
from clipbatch.orchestration.models import fingerprint
from clipbatch.orchestration.planner import plan
from clipbatch.core.storage import open_storage
from clipbatch.core.specs import JobSpec, ModelSpec, SpecError


def spec(folder, out, pretrained="some-tag", **options) -> JobSpec:
    return JobSpec(str(folder), str(out), ModelSpec("clipbatch-tiny", pretrained), kind=options.pop("kind", "score"),
                   **options)


def commit_all(p, out, samples_ok: int = 1) -> None:
    storage = open_storage(str(out))
    for i in p.todo:
        info = open_storage(p.shards[i].rsplit("/", 1)[0]).info(p.shards[i].rsplit("/", 1)[1])
        record = {"input": p.shards[i], "input_size": info.size, "input_etag": info.etag, "samples_ok": samples_ok,
                  "samples_failed": 1 - samples_ok, "fingerprint": p.spec.fingerprint,
                  "model": {"name": "clipbatch-tiny"}, "modality": p.spec.modality}
        commit.commit(storage, i, f"a{i}", {f"x/{i}": b"x"}, record)


def write(path, data: bytes) -> None:
    path.write_bytes(data)


def test_indices_are_sorted_on_a_fresh_output_and_stable_after(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a.tar", "c.tar", "d.tar"):
        write(folder / name, name.encode())
    first = plan(spec(folder, out))
    assert [first.shards[i].rsplit("/", 1)[1] for i in sorted(first.shards)] == ["a.tar", "c.tar", "d.tar"]
    commit_all(first, out)

    # nothing new: nothing to do
    assert plan(spec(folder, out)).todo == []

    # a new shard sorting in the middle goes past the end; a rewritten one keeps its index
    write(folder / "b.tar", b"b")
    write(folder / "c.tar", b"c, rewritten")
    os.utime(folder / "c.tar", ns=(1, 1))
    third = plan(spec(folder, out))
    assert {third.shards[i].rsplit("/", 1)[1]: i for i in third.todo} == {"b.tar": 3, "c.tar": 1}
    assert third.rescored == [1] and sorted(third.committed) == [0, 2]

    # a shard whose marker was deleted by hand runs again at its sorted position
    open_storage(str(out)).delete(layout.marker(0))
    assert plan(spec(folder, out)).todo.count(0) == 1


def test_another_model_is_refused(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write(folder / "a.tar", b"a")
    commit_all(plan(spec(folder, out)), out)
    with pytest.raises(SpecError, match="another model"):
        plan(spec(folder, out, pretrained="other-tag"))


def test_the_modality_is_part_of_the_fingerprint_and_a_change_is_refused(tmp_path):
    # given an output of image-only embeddings
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write(folder / "a.tar", b"a")
    commit_all(plan(spec(folder, out, kind="embed", modality="image")), out)
    # then a pairs fingerprint is the one it was before modalities; each modality has its own
    model = ModelSpec("clipbatch-tiny", "some-tag")
    assert fingerprint(model) == fingerprint(model, "pairs") != fingerprint(model, "image") != fingerprint(model, "text")
    # and another modality on it is refused naming the option (an embed job) or the output (a score job)
    with pytest.raises(SpecError, match=r"^--modality: .*--modality image"):
        plan(spec(folder, out, kind="embed", modality="text"))
    with pytest.raises(SpecError, match=r"^--output: .*--modality image"):
        plan(spec(folder, out))
    assert plan(spec(folder, out, kind="embed", modality="image")).todo == []


def test_a_shard_that_embedded_nothing_runs_again_in_another_modality(tmp_path):
    # given an output whose only shard embedded nothing as pairs (say, images without captions)
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write(folder / "a.tar", b"a")
    commit_all(plan(spec(folder, out, kind="embed")), out, samples_ok=0)
    # when the same input is planned image-only into it, then the shard runs again
    again = plan(spec(folder, out, kind="embed", modality="image"))
    assert again.todo == [0] and again.rescored == [0]
