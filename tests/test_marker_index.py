"""The marker index (core/marker_index.py): a checked cache of the output's markers, never trusted over them.

Given an output whose markers are written, deleted and rewritten while its index goes missing,
stale or corrupt, when the markers are read through the index, then they are exactly what
``commit.list_markers`` reads one GET at a time; and a resubmit reads only the markers that are
new or changed since the index was written (counted here per storage call, and in the nightly
rerun below per HTTP request through the counting proxy, with a real worker).
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import pytest

from clipbatch.core import commit, layout, marker_index
from clipbatch.core.storage import Storage, open_storage
from tests import synthetic
from tests.conftest import run_cli, service_env
from tests.s3proxy import FaultyS3Proxy

SEEDS = (0, 1, 2)
STEPS = 70
OLD = time.time() - 3600  # a marker committed an hour ago: past the racy window


class CountingStorage:
    """A real storage whose calls are counted by method (the planner's threads share it)."""

    def __init__(self, inner: Storage) -> None:
        self.inner, self.uri, self.calls, self._lock = inner, inner.uri, Counter(), threading.Lock()

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def counted(*args, **kwargs):
            with self._lock:
                self.calls[name] += 1
            return method(*args, **kwargs)
        return counted

    def reset(self) -> Counter:
        with self._lock:
            calls, self.calls = self.calls, Counter()
        return calls


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/out")


def marker_bytes(i: int, rng: random.Random) -> bytes:
    """A marker as commit writes one; every rewrite keeps the length (a local ETag is mtime and size)."""
    return json.dumps({"index": i, "input": f"s3://in/{i}.tar", "attempt": f"{rng.getrandbits(64):016x}",
                       "files": [f"stats/{i}.json"], "samples_ok": 1, "samples_failed": 0}, sort_keys=True).encode()


def age(storage: Storage, i: int) -> None:
    """Back-date a local marker, as if committed about an hour ago, each write at its own time as
    a clock gives (S3 ETags do not depend on time)."""
    if not storage.uri.startswith("s3://"):
        when = next(_AGES)
        os.utime(Path(storage.uri) / layout.marker(i), (when, when))


_AGES = itertools.count(OLD, 0.25)


def corrupt(storage: Storage, rng: random.Random) -> str:
    """Damage the stored index one of the ways a cache goes wrong; returns which."""
    data = marker_index.dump(marker_index.load(storage) or {})  # damage a good index (the stored one may be damaged already)
    lines = gzip.decompress(data).decode().split("\n")
    header, entries = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    kind = rng.choice(["truncate", "garbage", "flip", "not_json", "version", "invent", "forget", "etag", "count",
                       "mislabel", "delete"])
    if kind == "truncate":
        data = data[: len(data) // 2]
    elif kind == "garbage":
        data = rng.randbytes(200)
    elif kind == "flip":
        at = rng.randrange(10, len(data))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    elif kind == "not_json":
        data = gzip.compress(b"<html>503 Slow Down</html>")
    elif kind == "delete":
        storage.delete(layout.MARKER_INDEX)
        return kind
    else:
        entries, header = _edit(kind, entries, header, rng)
        data = gzip.compress("\n".join(json.dumps(x) for x in [header, *entries]).encode())
    storage.write(layout.MARKER_INDEX, data)
    return kind


def _edit(kind: str, entries: list, header: dict, rng: random.Random) -> tuple[list, dict]:
    """A well-formed index that lies: an entry for no marker, one missing, a stale ETag, or a bad header."""
    if kind == "version":
        header = {**header, "version": marker_index.VERSION + 1}
    elif kind == "invent":  # a committed shard the markers do not hold, with a plausible ETag
        entries.append([777_777, "0" * 32, marker_bytes(777_777, rng).decode()])
        header = {**header, "count": len(entries)}
    elif kind == "forget" and entries:
        entries.pop(rng.randrange(len(entries)))
        header = {**header, "count": len(entries)}
    elif kind == "etag" and entries:  # stale content under an ETag the LIST no longer reports
        i = rng.randrange(len(entries))
        entries[i] = [entries[i][0], "stale", marker_bytes(entries[i][0], rng).decode()]
    elif kind == "count":
        header = {**header, "count": len(entries) + 1}
    elif kind == "mislabel" and entries:  # an entry whose marker names another index
        entries[0] = [entries[0][0] + 1, entries[0][1], entries[0][2]]
    return entries, header


def step(storage: Storage, rng: random.Random, pool: list[int]) -> str:
    """One random change to the output's markers or its index."""
    present = [i for i in pool if storage.exists(layout.marker(i))]
    op = rng.choice(["commit", "commit", "delete", "rewrite", "rewrite", "junk", "corrupt", "refresh", "refresh"])
    if op == "commit" or (op in ("delete", "rewrite") and not present):
        i = rng.choice(pool)
        storage.create_exclusive(layout.marker(i), marker_bytes(i, rng))
        if rng.random() < 0.5:
            age(storage, i)
    elif op == "delete":
        storage.delete(layout.marker(rng.choice(present)))
    elif op == "rewrite":  # other content, as many bytes: only the ETag can tell
        i = rng.choice(present)
        storage.write(layout.marker(i), marker_bytes(i, rng))
    elif op == "junk":  # keys under _commits/ that are not a marker's own name
        storage.write(rng.choice(["_commits/notes.txt", "_commits/7.json", "_commits/sub/00003.json",
                                  "_commits/00004.json.part2"]), b"{}")
    elif op == "corrupt":
        return "corrupt:" + corrupt(storage, rng)
    else:
        marker_index.refresh(storage)
    return op


@pytest.mark.parametrize("seed", SEEDS)
def test_the_index_never_hides_or_invents_a_committed_shard(storage, seed):
    # given markers at small and large indices (past 99,999), written, deleted, rewritten at random
    rng = random.Random(seed)
    pool = [0, 1, 2, 3, 4, 5, 7, 40, 99_998, 99_999, 100_000, 123_456]
    ops = Counter()
    for _ in range(STEPS):
        ops[step(storage, rng, pool)] += 1
        # when they are read through the index (with or without writing it back)
        truth = commit.list_markers(storage)
        refreshed = rng.random() < 0.5
        read = marker_index.refresh(storage) if refreshed else marker_index.read_markers(storage)
        # then they are exactly the markers, and an index written back holds exactly them
        assert read == truth, (seed, ops)
        if refreshed:
            stored = marker_index.load(storage)
            assert stored is not None and {i: json.loads(raw) for i, (_, raw) in stored.items()} == truth
    assert ops["rewrite"] and ops["delete"] and sum(n for op, n in ops.items() if op.startswith("corrupt")), ops


def test_a_resubmit_reads_only_the_markers_that_are_new_or_changed(storage):
    # given 60 committed shards and their index
    rng = random.Random(5)
    counted = CountingStorage(storage)
    for i in range(60):
        storage.create_exclusive(layout.marker(i), marker_bytes(i, rng))
        age(storage, i)
    assert marker_index.refresh(counted) == commit.list_markers(storage)
    built = counted.reset()
    assert (built["read"], built["write"], built["list_info"]) == (61, 1, 1)  # the missing index, 60 markers

    # when nothing changed: one GET (the index), one LIST, no write
    assert marker_index.refresh(counted) == commit.list_markers(storage)
    assert counted.reset() == Counter({"read": 1, "list_info": 1})

    # when 2 shards are committed, 1 rewritten and 1 deleted: 3 marker GETs and the index written once
    for i in (60, 61):
        storage.create_exclusive(layout.marker(i), marker_bytes(i, rng))
        age(storage, i)
    storage.write(layout.marker(10), marker_bytes(10, rng))
    age(storage, 10)
    storage.delete(layout.marker(20))
    assert marker_index.refresh(counted) == commit.list_markers(storage)
    assert counted.reset() == Counter({"read": 1 + 3, "list_info": 1, "write": 1})
    assert marker_index.read_markers(counted) == commit.list_markers(storage)
    assert counted.reset() == Counter({"read": 1, "list_info": 1})


def test_a_local_marker_rewritten_within_one_clock_tick_is_not_trusted(tmp_path):
    # given a local marker read into the index just after it was written
    storage = open_storage(str(tmp_path / "out"))
    rng = random.Random(9)
    storage.create_exclusive(layout.marker(3), marker_bytes(3, rng))
    path = tmp_path / "out" / layout.marker(3)
    tick = path.stat().st_mtime_ns
    marker_index.refresh(storage)
    # when it is rewritten with other bytes of the same length in the same clock tick (same ETag)
    before = storage.list_info(layout.MARKER_DIR + "/")[layout.marker(3)].etag
    storage.write(layout.marker(3), marker_bytes(3, rng))
    os.utime(path, ns=(tick, tick))
    assert storage.list_info(layout.MARKER_DIR + "/")[layout.marker(3)].etag == before
    # then the index does not hide the rewrite: a marker that young was cached as untrusted
    assert marker_index.read_markers(storage) == commit.list_markers(storage)
    assert marker_index.read_markers(storage)[3]["attempt"] == json.loads(storage.read(layout.marker(3)))["attempt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "not_json", "version", "invent", "forget",
                                    "etag", "count", "mislabel", "delete"])
def test_a_damaged_index_is_rebuilt_from_the_markers(tmp_path, damage):
    # given an index of 5 old markers
    storage = open_storage(str(tmp_path / "out"))
    rng = random.Random(1)
    for i in range(5):
        storage.create_exclusive(layout.marker(i), marker_bytes(i, rng))
        age(storage, i)
    marker_index.refresh(storage)
    # when it is damaged
    class Always(random.Random):
        def choice(self, seq):
            return damage if damage in seq else super().choice(seq)
    assert corrupt(storage, Always(2)) == damage
    # then the markers read through it are still the markers, and the next refresh writes a good index
    assert marker_index.read_markers(storage) == commit.list_markers(storage)
    assert marker_index.refresh(storage) == commit.list_markers(storage)
    stored = marker_index.load(storage)
    assert stored is not None and {i: json.loads(raw) for i, (_, raw) in stored.items()} == commit.list_markers(storage)


def test_the_index_a_jobs_end_writes_is_read_as_the_markers_are(storage):
    # given: an output indexed at its plan (markers 0-3), then a job that committed 4-6 and rewrote 2, and a
    # marker 3 rewritten by someone else after the end's LIST
    rng = random.Random(7)
    for i in range(4):
        storage.write(layout.marker(i), marker_bytes(i, rng))
        age(storage, i)
    marker_index.refresh(storage)
    mine = {}
    for i in (2, 4, 5, 6):
        storage.write(layout.marker(i), marker_bytes(i, rng))
        age(storage, i)
        mine[i] = json.loads(storage.read(layout.marker(i)))
    listed_at, listing = time.time(), storage.list_info("")
    storage.write(layout.marker(3), marker_bytes(3, rng))
    age(storage, 3)

    # when: the job's end writes the index from its LIST and its own markers
    marker_index.after_job(storage, listing, listed_at, mine)

    # then: the markers read through it are the markers, and the next read fetches only marker 3
    counting = CountingStorage(storage)
    assert marker_index.read_markers(counting) == commit.list_markers(storage)
    assert counting.reset()["read"] == 1 + 1  # the index and marker 3


# --- a nightly rerun through the real CLI and a real worker, its requests counted by the proxy ---

COMMITTED = 200
NOTHING_NEW_GETS = 1  # the index; no marker read when no marker changed since it was written


def _submit(env: dict[str, str], fx, queue: str) -> str:
    done = run_cli("submit", "embed", "--input", fx.input, "--output", fx.output, "--model", synthetic.MODEL,
                   "--batch-size", "8", "--queue", queue, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def _wait(env: dict[str, str], job_id: str) -> dict[str, Any]:
    watched = run_cli("status", job_id, "--watch", "--json", env=env)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    return json.loads(watched.stdout)


def _night(proxy, env_counted: dict[str, str], env: dict[str, str], fx, queue: str) -> tuple[Counter, dict]:
    """One submit through the counting proxy (the worker talks to the store directly), then its end."""
    proxy.reset()
    job_id = _submit(env_counted, fx, queue)
    counts = proxy.snapshot()
    return counts, _wait(env, job_id)


def _attempts(storage: Storage) -> dict[int, str]:
    return {i: m["attempt"] for i, m in commit.list_markers(storage).items()}


@pytest.mark.integration
def test_a_nightly_rerun_runs_only_new_and_changed_shards_and_its_plan_reads_no_old_marker(
        redis_url, s3_endpoint, bucket, tmp_path, start_worker):
    # given an S3 output of 200 committed shards (built directly), a real worker, and a CLI whose
    # requests go through a counting proxy (the worker's do not)
    fx = synthetic.build(str(tmp_path / "in"), f"s3://{bucket}/out", COMMITTED)
    storage = open_storage(fx.output)
    queue = f"nightly-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_CACHE_DIR=str(tmp_path / "cache"))
    start_worker(queue, env)
    upstream = urlparse(s3_endpoint)
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0) as proxy:
        counted = {**env, "AWS_ENDPOINT_URL_S3": proxy.url}
        # the first plan since the upgrade reads every marker once and writes the index
        first, status = _night(proxy, counted, env, fx, queue)
        assert status["state"] == "succeeded" and status["shards_skipped"] == COMMITTED, status
        assert first["GET"] >= COMMITTED and storage.exists(layout.MARKER_INDEX)

        # when a night brings 2 new input shards and rewrites 1 (a new ETag), the rest unchanged
        before = _attempts(storage)
        synthetic.add_inputs(fx.input, COMMITTED, 2)
        open_storage(fx.input).write(synthetic.input_name(7), synthetic.tar_bytes(7) + b"\0" * 512)
        nightly, status = _night(proxy, counted, env, fx, queue)

        # then exactly the new and the changed shards ran, and every other commit is untouched
        assert status["state"] == "succeeded", status
        assert (status["shards_total"], status["shards_skipped"], status["shards_rescored"]) == (COMMITTED + 2,
                                                                                               COMMITTED - 1, 1)
        after = _attempts(storage)
        ran = {i for i in after if after[i] != before.get(i)}
        assert ran == {7, COMMITTED, COMMITTED + 1}
        # and its plan read the index, no marker (none changed since the index was written)
        assert nightly["GET"] == NOTHING_NEW_GETS, nightly

        # when the next night brings nothing: the 3 markers committed since are in the index their job's
        # end wrote, and none is read
        quiet, _ = _night(proxy, counted, env, fx, queue)
        assert quiet["GET"] == NOTHING_NEW_GETS, quiet
        again, _ = _night(proxy, counted, env, fx, queue)
        assert again == quiet, (quiet, again)

        # and when the committed shards double, a plan with nothing new costs what it did at 200
        more = synthetic.add_inputs(fx.input, COMMITTED + 2, COMMITTED)
        synthetic.commit_shards(fx.spec, more)
        grown, _ = _night(proxy, counted, env, fx, queue)
        assert grown["GET"] == NOTHING_NEW_GETS + COMMITTED  # O(new markers): the 200 added
        doubled, status = _night(proxy, counted, env, fx, queue)
        assert status["shards_skipped"] == 2 * COMMITTED + 2
        assert doubled == again, (again, doubled)
    print(f"submit requests by kind: first plan {dict(first)}; nightly {dict(nightly)}; nothing new at "
          f"{COMMITTED + 2} committed {dict(again)}, at {2 * COMMITTED + 2} {dict(doubled)}")


@pytest.mark.integration
def test_the_plan_right_after_a_job_reads_none_of_its_markers_whatever_the_shard_count(
        redis_url, s3_endpoint, bucket, tmp_path, start_worker):
    # given: two fresh S3 outputs, of 3 and 12 input shards, each embedded once by a real worker (the plan of
    # a fresh output has no marker to read: the job's end writes the index of what it committed)
    queue = f"after-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_CACHE_DIR=str(tmp_path / "cache"))
    start_worker(queue, env)
    upstream = urlparse(s3_endpoint)
    rerun = {}
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0) as proxy:
        counted = {**env, "AWS_ENDPOINT_URL_S3": proxy.url}
        for shards in (3, 12):
            fx = SimpleNamespace(input=str(tmp_path / f"in{shards}"), output=f"s3://{bucket}/out{shards}")
            synthetic.add_inputs(fx.input, 0, shards)
            status = _wait(env, _submit(env, fx, queue))
            assert (status["state"], status["shards_done"], status["shards_skipped"]) == ("succeeded", shards, 0)

            # when: the output is planned again right after, every request of the submit counted
            rerun[shards], status = _night(proxy, counted, env, fx, queue)
            assert (status["state"], status["shards_skipped"]) == ("succeeded", shards), status

    # then: the plan read the index and no marker, and made the same requests at 3 and at 12 shards
    print(f"submit requests right after a job: 3 shards {dict(rerun[3])}, 12 shards {dict(rerun[12])}")
    assert rerun[3]["GET"] == rerun[12]["GET"] == NOTHING_NEW_GETS, rerun
    assert rerun[3] == rerun[12]
