"""A job's end does not grow with its output (issue 16, item 4): the shards' stats are merged into the
job's Redis totals as they are counted, and the end adds them to the totals the last end saved.

Real Redis and the moto server (behind the request-counting proxy); the committed part of each output
is built directly (markers, stats and files), so an output of hundreds of shards costs seconds.
"""
from __future__ import annotations

import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
import redis

from clipbatch.core import layout, marker_index, merged
from clipbatch.core.jobs import Counted, JobStore
from clipbatch.core.report import SUMMARY, full_totals, keep_replaced_stats
from clipbatch.core.scores import histogram, summarize
from clipbatch.core.storage import open_storage
from clipbatch.tasks.finalize import finalize
from tests.s3proxy import FaultyS3Proxy

pytestmark = pytest.mark.integration

REASON = "image (jpg) undecodable"


def commit_shard(storage, index: int, job_id: str, rng: np.random.Generator) -> dict:
    """A committed shard as a worker leaves it: files in place, stats with a score histogram, marker."""
    attempt, ok, failed = uuid.uuid4().hex, int(rng.integers(5, 40)), int(rng.integers(0, 3))
    stats = {"attempt": attempt, "index": index, "samples_ok": ok, "samples_failed": failed,
             "error_reasons": {REASON: failed} if failed else {},
             "clip_score": histogram(rng.normal(0.25, 0.08, ok).clip(-1, 0.999))}
    names = layout.embed_files(index)
    files = {names["stats"]: json.dumps(stats).encode(), names["errors"]: b"e", names["metadata"]: b"m",
             names["img"]: b"i", names["text"]: b"t"}
    for name, data in files.items():
        storage.write(name, data)
    marker = {"index": index, "attempt": attempt, "files": sorted(files), "input": f"s3://in/{index:06d}.tar",
              "job_id": job_id, "kind": "embed", "samples_ok": ok, "samples_failed": failed}
    storage.write(layout.marker(index), json.dumps(marker).encode())
    return {"marker": marker, "stats": stats}


def pages(keys: int) -> int:
    """LIST requests to list this many keys (S3 answers 1,000 a page)."""
    return -(-keys // 1000)


def spec(output: str) -> dict:
    return {"kind": "embed", "input": "s3://in/", "output": output, "queue": "q", "modality": "pairs", "model": {"name": "tiny"}}


def committed_output(storage, shards: int, seed: int) -> dict[int, dict]:
    """An output a first job committed and ended: its markers, and the totals its end saved."""
    with ThreadPoolExecutor(16) as pool:
        built = list(pool.map(lambda i: commit_shard(storage, i, "first", np.random.default_rng([seed, i])),
                              range(shards)))
    markers = {b["marker"]["index"]: b["marker"] for b in built}
    merged.save(storage, merged.from_stats(markers, {i: b["stats"] for i, b in enumerate(built)}))
    return markers


def next_job(jobs: JobStore, storage, markers: dict[int, dict], rescore: list[int], new: int, seed: int) -> str:
    """A second job as its plan and workers leave it: the plan keeps the unchanged shards and drops the
    rescored ones' markers (keeping their stats); its shards commit and are counted, one twice."""
    job_id = uuid.uuid4().hex
    kept = {i: m for i, m in markers.items() if i not in rescore}
    for index in rescore:
        keep_replaced_stats(storage, index)
        storage.delete(layout.marker(index))
    jobs.create(job_id, spec(storage.uri), len(markers) + new, kept, len(rescore))
    rng = np.random.default_rng(seed)
    todo = [*rescore, *range(len(markers), len(markers) + new)]
    for index in todo:
        shard = commit_shard(storage, index, job_id, rng)
        counted = Counted(merged.shard_record(shard["marker"], shard["stats"]), shard["stats"], before=False)
        for _ in range(2 if index == todo[0] else 1):  # a duplicate delivery reports again
            jobs.report_done(job_id, index, shard["marker"]["samples_ok"], shard["marker"]["samples_failed"], counted)
    return job_id


@pytest.fixture()
def jobs(redis_url) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url, decode_responses=True), ttl_s=600)


def full_merge(storage) -> dict:
    """The report as reading every committed shard's stats gives it."""
    _, totals = full_totals(storage)
    return summarize(merged.with_bounds(totals)) | {"reasons": dict(totals.reasons), "shards": len(totals.covers),
                                                    "embedded": totals.samples()[0]}


def assert_report_is_the_full_merge(storage) -> None:
    got, want = json.loads(storage.read(SUMMARY)), full_merge(storage)
    for key in ("count", "min", "max", "quantiles", "fraction_kept", "histogram", "shards"):
        assert got[key] == want[key], key
    assert (got["error_reasons"], got["embedded"]["pairs"]) == (want["reasons"], want["embedded"])
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12) and got["std"] == pytest.approx(want["std"], rel=1e-9)


def test_finalisation_requests_do_not_grow_with_the_committed_shards(jobs, bucket, s3_endpoint, monkeypatch, caplog):
    # given: two outputs, of 150 and 300 committed shards, each getting a job that rescores 2 and adds 3
    upstream = urlparse(s3_endpoint)
    counts = {}
    with FaultyS3Proxy((upstream.hostname, upstream.port), 0.0) as proxy:
        for shards in (150, 300):
            storage = open_storage(f"s3://{bucket}/out{shards}")
            job_id = next_job(jobs, storage, committed_output(storage, shards, seed=shards), [3, 7], 3, seed=1)
            keys = len(storage.list(""))

            # when: the job ends, every request it makes going through the counting proxy
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
            proxy.reset()
            with caplog.at_level(logging.INFO, "clipbatch.finalize"):
                assert finalize(jobs, job_id)["state"] == "succeeded"
            counts[shards] = (proxy.snapshot(), keys)
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)

            # then: it took the bounded path, and its report is what reading every shard's stats gives
            assert "merged=bounded" in caplog.text and "merges every shard" not in caplog.text
            caplog.clear()
            assert_report_is_the_full_merge(storage)

    # then: every kind of request but LIST is the same at twice the shards; LIST grows by the pages
    # of the one listing of the output that checks its markers and files (1,000 keys a page)
    (small, small_keys), (large, large_keys) = counts[150], counts[300]
    print(f"finalisation requests: 150 shards {dict(small)}, 300 shards {dict(large)}")
    assert {k: n for k, n in small.items() if k != "LIST"} == {k: n for k, n in large.items() if k != "LIST"}
    assert large["LIST"] - small["LIST"] == pages(large_keys) - pages(small_keys) > 0
    assert small["GET"] == 1 + 2 + 1  # the saved totals, the two rescored shards' old stats, the marker index
    assert sum(small.values()) <= 20


def test_a_duplicate_report_is_merged_once_and_the_state_expires_with_the_job(jobs, tmp_path):
    # given: a job of two shards on a fresh output
    storage = open_storage(str(tmp_path / "out"))
    job_id = uuid.uuid4().hex
    jobs.create(job_id, spec(storage.uri), 2, {})
    rng = np.random.default_rng(0)
    shards = [commit_shard(storage, i, job_id, rng) for i in range(2)]

    # when: shard 0 is reported three times (redeliveries), shard 1 once
    for shard, times in zip(shards, (3, 1)):
        counted = Counted(merged.shard_record(shard["marker"], shard["stats"]), shard["stats"], before=False)
        for _ in range(times):
            jobs.report_done(job_id, shard["marker"]["index"], shard["stats"]["samples_ok"],
                             shard["stats"]["samples_failed"], counted)

    # then: the job's totals hold each shard once, and every key holding them expires with the job
    state = jobs.job_shards(job_id, jobs.get(job_id))
    want = merged.from_stats({i: s["marker"] for i, s in enumerate(shards)}, {i: s["stats"] for i, s in enumerate(shards)})
    assert {k: state.added.merged[k] for k in ("count", "bins", "at_least")} == \
        {k: want.merged[k] for k in ("count", "bins", "at_least")}
    assert state.added.merged["sum"] == pytest.approx(want.merged["sum"], rel=1e-12)
    assert state.added.reasons == want.reasons and set(state.counted) == {0, 1}
    for key in (f"clipbatch:job:{job_id}:commits", f"clipbatch:job:{job_id}:merged"):
        assert 0 < jobs.r.ttl(key) <= 600


def test_the_end_indexes_the_jobs_markers_and_frees_their_records(jobs, tmp_path):
    # given: a job of three shards on a fresh output, each counted with its marker
    storage = open_storage(str(tmp_path / "out"))
    job_id = uuid.uuid4().hex
    jobs.create(job_id, spec(storage.uri), 3, {})
    rng = np.random.default_rng(1)
    shards = [commit_shard(storage, i, job_id, rng) for i in range(3)]
    for shard in shards:
        counted = Counted(merged.shard_record(shard["marker"], shard["stats"]), shard["stats"], False, shard["marker"])
        jobs.report_done(job_id, shard["marker"]["index"], shard["stats"]["samples_ok"],
                         shard["stats"]["samples_failed"], counted)

    # when: it ends
    assert finalize(jobs, job_id)["state"] == "succeeded"

    # then: the marker index holds every marker it committed, and its per-shard records left Redis
    cached = marker_index.load(storage)
    assert {i: json.loads(raw) for i, (_, raw) in cached.items()} == {s["marker"]["index"]: s["marker"] for s in shards}
    assert not jobs.r.exists(f"clipbatch:job:{job_id}:commits", f"clipbatch:job:{job_id}:merged")


@pytest.mark.parametrize("damage", ["missing", "corrupt", "does_not_add_up", "stale"])
def test_saved_totals_that_cannot_be_trusted_fall_back_to_the_full_merge(jobs, tmp_path, caplog, damage):
    # given: a committed output whose saved totals are missing, unreadable, wrong or older than its markers
    storage = open_storage(str(tmp_path / "out"))
    markers = committed_output(storage, 12, seed=3)
    if damage == "missing":
        storage.delete(layout.MERGED)
    elif damage == "corrupt":
        storage.write(layout.MERGED, b'{"version": 1, "covers": {"0": [')
    elif damage == "does_not_add_up":  # one shard's sample count off by one: the job record disagrees
        raw = json.loads(storage.read(layout.MERGED))
        raw["covers"]["5"][merged.OK] += 1
        storage.write(layout.MERGED, json.dumps(raw).encode())
    else:  # a job committed shard 12 and never ended (Redis lost its state): the totals lack it
        markers[12] = commit_shard(storage, 12, "lost", np.random.default_rng(9))["marker"]
    job_id = next_job(jobs, storage, markers, [2], 2, seed=4)

    # when: the job ends
    with caplog.at_level(logging.INFO, "clipbatch.finalize"):
        assert finalize(jobs, job_id)["state"] == "succeeded"

    # then: it said why and merged every shard's stats; the report is exact and the new totals are right
    assert "merges every shard's stats" in caplog.text and "merged=full" in caplog.text
    assert_report_is_the_full_merge(storage)
    _, full = full_totals(storage)
    assert merged.load(storage).covers == full.covers


def test_the_next_end_is_bounded_again_after_a_fallback(jobs, tmp_path, caplog):
    # given: an output whose totals were lost, ended once by the full merge
    storage = open_storage(str(tmp_path / "out"))
    markers = committed_output(storage, 10, seed=5)
    storage.delete(layout.MERGED)
    first = next_job(jobs, storage, markers, [1], 1, seed=6)
    assert finalize(jobs, first)["state"] == "succeeded"

    # when: another job rescores a shard the first one rescored, and adds one
    markers = {int(layout.marker_index(k)): json.loads(storage.read(k)) for k in storage.list("_commits/")}
    second = next_job(jobs, storage, markers, [1, 4], 1, seed=7)
    with caplog.at_level(logging.INFO, "clipbatch.finalize"):
        assert finalize(jobs, second)["state"] == "succeeded"

    # then: bounded, exact, and the kept old stats are gone
    assert "merged=bounded" in caplog.text
    assert_report_is_the_full_merge(storage)
    assert not storage.list(layout.MERGED_DIR + "/replaced/")


def test_a_committed_shard_whose_files_went_missing_still_fails_the_job(jobs, tmp_path):
    # given: a committed output, then one skipped shard's stats file lost outright
    storage = open_storage(str(tmp_path / "out"))
    markers = committed_output(storage, 6, seed=8)
    storage.delete(layout.stats(2))

    # when: a job that keeps every shard ends
    job_id = next_job(jobs, storage, markers, [], 0, seed=9)
    status = finalize(jobs, job_id)

    # then: it fails naming the file, and the totals are not saved over an incomplete output
    failures = json.loads(storage.read(layout.JOB_FILE))["failures"]
    assert status["state"] == "failed" and "files are missing: stats/2.json" in failures["2"]
    assert not storage.exists(layout.MERGED)


def test_a_shard_counted_without_its_stats_sends_the_end_to_the_full_check(jobs, tmp_path, caplog):
    # given: a job whose shard 1 was counted by a redelivery that found its stats file gone
    storage = open_storage(str(tmp_path / "out"))
    markers = committed_output(storage, 4, seed=10)
    job_id = uuid.uuid4().hex
    jobs.create(job_id, spec(storage.uri), 4, {i: m for i, m in markers.items() if i != 1})
    storage.delete(layout.stats(1))
    jobs.report_done(job_id, 1, markers[1]["samples_ok"], markers[1]["samples_failed"], None)

    # when: the job ends
    with caplog.at_level(logging.INFO, "clipbatch.finalize"):
        status = finalize(jobs, job_id)

    # then: the totals did not add up, the full check named the missing file, the job failed
    assert "merges every shard's stats" in caplog.text and status["state"] == "failed"
    assert "stats/1.json" in json.loads(storage.read(layout.JOB_FILE))["failures"]["1"]
