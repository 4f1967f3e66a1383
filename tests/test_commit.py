"""Exactly-once commits: racing attempts with different bytes leave one consistent set of files."""
from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
import threading
import time

import pytest

from clipbatch.core import commit, layout
from clipbatch.core.storage import open_storage
from tests.conftest import S3_SERVERS, new_bucket, use_s3_server


@pytest.fixture(params=["local", *(pytest.param(server, marks=pytest.mark.integration) for server in S3_SERVERS)])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    use_s3_server(request, request.param)
    return open_storage(f"s3://{new_bucket()}/out")


def files_for(tag: str) -> dict[str, bytes]:
    return {"img_emb/img_emb_3.npy": f"img-{tag}".encode(), "stats/3.json": f"stats-{tag}".encode()}


def test_concurrent_attempts_one_winner_and_its_bytes(storage):
    # given: eight attempts with different bytes for the same shard, released at once
    barrier = threading.Barrier(8)
    results: dict[str, tuple[bool, dict]] = {}

    def attempt(tag: str) -> None:
        barrier.wait()
        results[tag] = commit.commit(storage, 3, f"attempt-{tag}", files_for(tag), {"samples_ok": 1, "samples_failed": 0})

    threads = [threading.Thread(target=attempt, args=(str(i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # then: exactly one won, everybody agrees on the winner, and the files are the winner's
    winners = [tag for tag, (won, _) in results.items() if won]
    assert len(winners) == 1
    assert {m["attempt"] for _, m in results.values()} == {f"attempt-{winners[0]}"}
    for name, data in files_for(winners[0]).items():
        assert storage.read(name) == data
    assert storage.list(layout.TMP_DIR + "/") == []
    assert commit.read_marker(storage, 3)["attempt"] == f"attempt-{winners[0]}"


def test_rerun_finishes_an_interrupted_move(storage):
    # given: an attempt that committed its marker but died before moving its files
    for name, data in files_for("w").items():
        storage.write(layout.staged("attempt-w", name), data)
    marker = {"index": 3, "attempt": "attempt-w", "files": sorted(files_for("w")), "samples_ok": 1}
    assert storage.create_exclusive(layout.marker(3), json.dumps(marker).encode())
    assert not commit.is_finished(storage, marker)

    # when: a later attempt races for the same shard
    won, seen = commit.commit(storage, 3, "attempt-late", files_for("late"), {"samples_ok": 1})

    # then: it lost, and the first attempt's files are in place
    assert not won and seen["attempt"] == "attempt-w"
    assert storage.read("img_emb/img_emb_3.npy") == b"img-w"
    assert commit.is_finished(storage, seen)
    commit.finish(storage, seen)  # idempotent
    assert storage.read("stats/3.json") == b"stats-w"


def test_list_markers(storage):
    for i in (0, 2):
        commit.commit(storage, i, f"a{i}", {f"x_{i}": b"x"}, {"samples_ok": i, "samples_failed": 0})
    assert sorted(commit.list_markers(storage)) == [0, 2]


def test_a_retried_put_that_had_landed_is_still_our_win(storage):
    # given: our marker is already there (the first try of a retried PUT landed)
    files = files_for("me")
    marker = {"index": 3, "attempt": "attempt-me", "files": sorted(files), "samples_ok": 1}
    for name, data in files.items():
        storage.write(layout.staged("attempt-me", name), data)
    storage.create_exclusive(layout.marker(3), json.dumps(marker).encode())

    # when: the same attempt commits
    won, seen = commit.commit(storage, 3, "attempt-me", files, {"samples_ok": 1})

    # then: it is the winner and its files are in place
    assert won and seen["attempt"] == "attempt-me"
    assert storage.read("img_emb/img_emb_3.npy") == b"img-me"


def test_a_bundle_is_deterministic_and_a_plain_tar():
    files = {"b/x.npy": b"\x00" * 700, "a.json": b"{}", "c/long/" + "n" * 120 + ".parquet": b"p"}
    bundle = commit.pack(files)
    assert bundle == commit.pack(dict(reversed(files.items())))
    assert commit.unpack(bundle) == files
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        assert tar.getnames() == sorted(files) and {m.mtime for m in tar.getmembers()} == {0}


def test_an_attempt_dead_before_its_marker_leaves_only_a_sweepable_bundle(storage):
    # given: an attempt that staged its bundle and died before racing for the marker
    storage.write(layout.bundle("attempt-dead"), commit.pack(files_for("dead")))

    # when: the next attempt commits
    won, marker = commit.commit(storage, 3, "attempt-next", files_for("next"), {"samples_ok": 1})

    # then: it won with its own bytes; the dead attempt's bundle is an orphan the sweep removes
    assert won and storage.read("stats/3.json") == b"stats-next"
    staged = commit.staged_attempts(storage)
    assert list(staged) == ["attempt-dead"] and commit.unfinished({3: marker}, staged) == set()
    assert commit.sweep_orphans(storage, {3: marker}, older_than=0) == 0  # too young yet
    assert commit.sweep_orphans(storage, {3: marker}, older_than=time.time() + 60) == 1
    assert storage.list(layout.TMP_DIR + "/") == []


@pytest.mark.parametrize("limit", [commit.BUNDLE_MAX_BYTES, 0], ids=["bundle", "file_by_file"])
def test_a_commit_aborted_between_its_upload_and_its_marker_leaves_nothing(storage, monkeypatch, limit):
    # given: an attempt whose job is cancelled while its files upload (the check before the marker raises)
    monkeypatch.setattr(commit, "BUNDLE_MAX_BYTES", limit)
    staged = []

    def cancelled() -> None:
        staged.extend(storage.list(layout.TMP_DIR + "/"))
        raise RuntimeError("cancelled")

    # when: it commits
    with pytest.raises(RuntimeError, match="cancelled"):
        commit.commit(storage, 3, "attempt-c", files_for("c"), {"samples_ok": 1}, before_marker=cancelled)

    # then: the check ran once the files were staged; no marker, no file in place, nothing left staged
    assert staged and commit.read_marker(storage, 3) is None
    assert storage.list("") == []


def test_a_winner_dead_before_deleting_its_bundle_is_finished_idempotently(storage):
    # given: the winner put every file in place and died before deleting its bundle
    files = files_for("w")
    storage.write(layout.bundle("attempt-w"), commit.pack(files))
    marker = {"index": 3, "attempt": "attempt-w", "files": sorted(files), "staging": commit.STAGING_BUNDLE,
              "samples_ok": 1}
    assert storage.create_exclusive(layout.marker(3), json.dumps(marker).encode())
    for name, data in files.items():
        storage.write(name, data)
    assert commit.unfinished({3: marker}, commit.staged_attempts(storage)) == {3}

    # when: a redelivery finds the marker unfinished and finishes it (tasks/lifecycle.py), twice
    assert not commit.is_finished(storage, commit.read_marker(storage, 3))
    commit.finish(storage, commit.read_marker(storage, 3))
    commit.finish(storage, commit.read_marker(storage, 3))

    # then: the winner's bytes, nothing staged
    assert {name: storage.read(name) for name in files} == files
    assert commit.is_finished(storage, marker) and storage.list(layout.TMP_DIR + "/") == []


def test_a_bundle_that_disagrees_with_its_marker_is_refused(storage):
    storage.write(layout.bundle("attempt-w"), commit.pack({"stats/3.json": b"s"}))
    marker = {"index": 3, "attempt": "attempt-w", "files": sorted(files_for("w")), "staging": commit.STAGING_BUNDLE}
    with pytest.raises(commit.CommitError, match="_bundle.tar holds"):
        commit.finish(storage, marker)
    assert not storage.exists("stats/3.json")


def test_a_commit_over_the_bundle_limit_stages_file_by_file(storage, monkeypatch):
    # given: a bundle limit smaller than the files
    monkeypatch.setattr(commit, "BUNDLE_MAX_BYTES", 4)

    # when: two attempts commit one after the other
    won, marker = commit.commit(storage, 3, "attempt-a", files_for("a"), {"samples_ok": 1})
    late, seen = commit.commit(storage, 3, "attempt-b", files_for("b"), {"samples_ok": 1})

    # then: the first won with per-file staging, its bytes are in place, nothing is staged
    assert won and not late and marker["staging"] == seen["staging"] == commit.STAGING_FILES
    assert {name: storage.read(name) for name in files_for("a")} == files_for("a")
    assert storage.list(layout.TMP_DIR + "/") == []


def test_a_forked_child_commits_on_its_own_io_threads(tmp_path):
    # given: this process committed (its I/O pool's threads exist here, and would not in a child)
    storage = open_storage(str(tmp_path / "out"))
    commit.commit(storage, 0, "parent", files_for("p"), {"samples_ok": 1})

    # when: a forked child commits (a prefork worker's process)
    with multiprocessing.get_context("fork").Pool(1) as child:
        won = child.apply_async(_commit_in_child, (str(tmp_path / "out"),)).get(timeout=60)

    # then: it did, with its own pool
    assert won and open_storage(str(tmp_path / "out")).read("stats/3.json") == b"stats-child"


def _commit_in_child(root: str) -> bool:
    return commit.commit(open_storage(root), 3, "child", files_for("child"), {"samples_ok": 1})[0]
