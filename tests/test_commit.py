"""Exactly-once commits: racing attempts with different bytes leave one consistent set of files."""
from __future__ import annotations

import threading

import pytest

from clipbatch.core import commit, layout
from clipbatch.core.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/out")


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
    assert storage.create_exclusive(layout.marker(3), __import__("json").dumps(marker).encode())
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
    storage.create_exclusive(layout.marker(3), __import__("json").dumps(marker).encode())

    # when: the same attempt commits
    won, seen = commit.commit(storage, 3, "attempt-me", files, {"samples_ok": 1})

    # then: it is the winner and its files are in place
    assert won and seen["attempt"] == "attempt-me"
    assert storage.read("img_emb/img_emb_3.npy") == b"img-me"
