"""Training-shard curation on the workers (core/curation.py): quality against the exact greedy, and
exactly-once output under kills, duplicate deliveries, resubmits and Redis state loss. Real
workers, real Redis; scored outputs with planted duplicates are written directly (no model)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
import webdataset as wds
from hypothesis import given, settings, strategies as st

from clipbatch.core import commit, keys
from clipbatch.core.broker import CURATE_STAGE, make_app
from clipbatch.core.config import Settings
from clipbatch.core.curation import load_plan
from clipbatch.core.selection import exact_curation, near_duplicates
from clipbatch.core.specs import TrainShardsSpec
from clipbatch.core.storage import open_storage
from clipbatch.workers.boundary import boundary_greedy
from tests.conftest import run_cli, service_env, wait_for
from tests.curation_data import assigned_clusters, plant, recall_precision, run_stages, straddling, write_scored

pytestmark = pytest.mark.integration

COSINE = 0.95
PAIRS, SHARDS, CLUSTER_SIZE = 12_000, 6, 1_000
OPTIONS = ["--top-fraction", "0.9", "--dedup-cosine", str(COSINE), "--dedup-exact", "--cluster-size",
           str(CLUSTER_SIZE), "--clusters-per-task", "2", "--samples-per-shard", "2500"]
STAGE_START = re.compile(r"shard start job=(\w+) shard=(\d+) .*#(\w+)=(\d+)")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[str, dict[str, tuple[int, int]]]:
    """12,000 pairs over 6 shards, with planted near-duplicate groups (30% of them half-way between two
    topics: on cluster boundaries) and exact duplicates."""
    return write_scored(tmp_path_factory.mktemp("curation"), plant(PAIRS, seed=7, boundary_share=0.3), SHARDS)


def submit(scored_uri: str, output: Path, queue: str, env: dict[str, str], wait: bool = True) -> dict:
    args = ["submit", "shards", "--scored", scored_uri, "--output", str(output), *OPTIONS, "--queue", queue, "--json"]
    result = run_cli(*args, *(["--wait"] if wait else []), env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def outputs(root: Path) -> dict[str, bytes]:
    """Every file a job leaves but its markers, its record and temporaries (attempt ids and times)."""
    skip = ("_commits/", "_tmp/", "_job.json")
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


def kept_rows(output: Path, where: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    sizes = json.loads((output / "sizes.json").read_text())
    keys = [json.loads(s["json"])["key"] for name in sizes
            for s in wds.WebDataset(str(output / name), shardshuffle=False)]
    return [where[k] for k in keys]


def starts(log: str) -> set[int]:
    return {int(m.group(2)) for m in STAGE_START.finditer(log)}


def _greedy(emb: np.ndarray, cosine: float) -> list[bool]:
    """The greedy by definition: each row in order against every row kept before it."""
    emb = emb.astype(np.float32) / np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True)
    kept, dropped = [], []
    for j in range(len(emb)):
        dropped.append(any(float(emb[j] @ emb[k]) >= cosine for k in kept))
        if not dropped[-1]:
            kept.append(j)
    return dropped


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 80), dim=st.integers(2, 6), block=st.integers(1, 30),
       cosine=st.floats(0.3, 0.99))
def test_blocked_near_duplicates_is_the_greedy(seed, n, dim, block, cosine):
    # given: rows with many close pairs (few dimensions), cut into blocks of any size
    emb = np.random.default_rng(seed).normal(size=(n, dim))
    # then: the blocked pass drops exactly the rows the row-by-row greedy drops
    assert near_duplicates(emb, cosine, block=block).tolist() == _greedy(emb, cosine)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), dim=st.integers(2, 5), cosine=st.floats(0.5, 0.99),
       anchors=st.floats(0, 1))
def test_the_boundary_greedy_drops_only_for_rows_that_stay_kept(seed, n, dim, cosine, anchors):
    # given: rows with many close pairs, some of them anchors (rows a dedup task dropped another row for)
    rng = np.random.default_rng(seed)
    emb, anchor = rng.normal(size=(n, dim)), rng.random(n) < anchors
    # when: the boundary pass's greedy runs over them
    dropped = boundary_greedy(emb, anchor, cosine)
    # then: no anchor is dropped, each dropped row has a kept row at the threshold (an anchor, or one before
    # it), and without anchors it is the plain greedy
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert not (dropped & anchor).any()
    for i in np.nonzero(dropped)[0]:
        assert any(sims[i, k] >= cosine - 1e-6 for k in np.nonzero(~dropped)[0] if anchor[k] or k < i)
    if not anchor.any():
        assert dropped.tolist() == _greedy(emb, cosine)


@pytest.mark.parametrize("seed", [1, 2])
def test_clusters_per_task_changes_the_files_not_the_selection(seed, tmp_path):
    # given: a scored output with duplicates on cluster boundaries, curated in clusters of 200
    scored_uri, _ = write_scored(tmp_path / "scored", plant(4_000, dim=64, seed=seed, boundary_share=0.5), 4)
    kept, groups = {}, {}
    # when: the stages run with 1, 2, 5 and the default number of clusters per dedup task
    for per_task in (1, 2, 5, None):
        spec = TrainShardsSpec(scored_uri, str(tmp_path / f"out-{per_task}"), top_fraction=0.9, dedup_cosine=COSINE,
                               dedup_exact=True, cluster_size=200, samples_per_shard=1000, clusters_per_task=per_task)
        plan, markers, rows, _ = run_stages(spec)
        kept[per_task], groups[per_task] = [r["key"] for r in rows], plan.groups
        assert sum(markers[plan.base("boundary") + g]["rows"] for g in range(plan.boundary)) > 0
    # then: the tars hold the same pairs in the same order; only the task count differs
    assert kept[1] == kept[2] == kept[5] == kept[None] and len(kept[1]) < 3_600
    assert groups[1] == plan.clusters > groups[2] > groups[5] > groups[None] == 1


_STAGES_IN = """
import sys
from clipbatch.core.specs import TrainShardsSpec
from tests.curation_data import run_stages
run_stages(TrainShardsSpec(sys.argv[1], sys.argv[2], top_fraction=0.9, dedup_cosine=0.95, dedup_exact=True,
                           cluster_size=100, clusters_per_task=4, samples_per_shard=2000))
"""


def test_the_stages_write_the_same_bytes_whatever_the_thread_count(tmp_path):
    # given: a scored output, and the stages run in two processes, one thread and two (faiss and BLAS)
    scored_uri, _ = write_scored(tmp_path / "scored", plant(6_000, dim=64, seed=9, boundary_share=0.3), 3)
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", _STAGES_IN, scored_uri, str(tmp_path / f"out-{threads}")], env=env,
                       check=True, cwd=Path(__file__).parents[1])
    # then: every file of every stage has the same bytes (the rows near a boundary depend on the last bits)
    one, two = outputs(tmp_path / "out-1"), outputs(tmp_path / "out-2")
    assert one.keys() == two.keys() and any("/edge/" in k for k in one)
    assert [k for k in one if one[k] != two[k]] == []


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 12), n=st.integers(1, 3))
def test_nearest_centroids_are_exact_and_break_ties_by_number(seed, k, n):
    # given: unit centroids, two of them equal (an exact tie), and unit rows
    from clipbatch.workers.curation import nearest, normalised
    rng = np.random.default_rng(seed)
    centroids = normalised(rng.normal(size=(k, 8)))
    centroids[rng.integers(1, k)] = centroids[0]
    rows = normalised(rng.normal(size=(50, 8)))
    # when: each row's n nearest are asked for
    sims, ids = nearest(centroids, rows, n)
    # then: they are the n first of every centroid ordered by (similarity, number), with their similarities
    for r in range(len(rows)):
        exact = [float(np.dot(rows[r], c)) for c in centroids]
        want = sorted(range(k), key=lambda c: (-exact[c], c))[:n]
        assert ids[r, :min(n, k)].tolist() == want[:min(n, k)]
        assert np.allclose(sims[r, :len(want)], [exact[c] for c in want], atol=1e-6)


def test_the_worker_processes_share_the_cpus_among_the_stages_threads(monkeypatch):
    # given: a machine of 8 CPUs
    from clipbatch.tasks import curation as stage_task
    monkeypatch.setattr(stage_task, "available_cpus", lambda: 8)
    for processes, threads in ((None, 8), ("1", 8), ("2", 4), ("3", 2), ("16", 1)):
        # when: the worker runs this many processes (clipbatch worker --concurrency)
        if processes is None:
            monkeypatch.delenv("CLIPBATCH_WORKER_PROCESSES", raising=False)
        else:
            monkeypatch.setenv("CLIPBATCH_WORKER_PROCESSES", processes)
        # then: each stage's faiss and BLAS get their share, at least one thread
        assert stage_task.stage_threads() == threads


def test_bad_curation_options_are_refused_naming_the_option(scored, tmp_path, redis_url):
    # given: a scored output, and one written with --no-embeddings (no image embeddings to compare)
    scored_uri, _ = scored
    env = service_env(redis_url)
    bare = tmp_path / "bare"
    (bare / "_commits").mkdir(parents=True)
    marker = json.loads(Path(scored_uri, "_commits", "00000.json").read_text())
    marker["files"] = [f for f in marker["files"] if not f.startswith("img_emb/")]
    (bare / "_commits" / "00000.json").write_text(json.dumps(marker))
    cases = [
        (["--scored", scored_uri, "--top-fraction", "0.5", "--cluster-size", "1"], "--cluster-size:"),
        (["--scored", scored_uri, "--top-fraction", "0.5", "--dedup-cosine", "1.5"], "--dedup-cosine:"),
        (["--scored", scored_uri, "--top-fraction", "0.5", "--clusters-per-task", "0"], "--clusters-per-task:"),
        (["--scored", str(bare), "--top-fraction", "0.5", "--dedup-cosine", "0.9"], "--dedup-cosine:"),
        (["--scored", str(tmp_path / "nothing"), "--top-fraction", "0.5"], "--scored:"),
    ]
    for args, needle in cases:
        # when: each is submitted
        result = run_cli("submit", "shards", *args, "--output", str(tmp_path / "out"), env=env)
        # then: one line naming the option, exit code 2, no traceback
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_second_plan_on_the_same_output_is_refused(scored, tmp_path, redis_url, start_worker):
    # given: an output curated with one set of options
    scored_uri, _ = scored
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    start_worker(queue, env)
    assert submit(scored_uri, tmp_path / "out", queue, env)["state"] == "succeeded"
    # when: another selection is submitted to it
    result = run_cli("submit", "shards", "--scored", scored_uri, "--output", str(tmp_path / "out"), "--top-fraction",
                     "0.5", "--queue", queue, env=env)
    # then: it is refused naming the output; the first job's tars are untouched
    assert result.returncode == 2 and "--output:" in result.stderr and "different selection" in result.stderr
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["kept"] > 0


def check_quality(scored_uri: str, where: dict[str, tuple[int, int]], out: Path, pairs: int) -> dict:
    """Against the exact greedy: the job's counts add up, the tars are in source order, recall >= 98% of the
    pairs the exact greedy removes, and precision 1.0, exactly (every dropped pair has a kept pair at cosine
    >= the threshold). Returns the job's stats."""
    spec = TrainShardsSpec(scored_uri, str(out), top_fraction=0.9, dedup_cosine=COSINE, dedup_exact=True)
    ref = exact_curation(spec)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] + stats["dropped_by_score"] + stats["dropped_as_duplicate"] == stats["total"] == pairs
    kept = kept_rows(out, where)
    assert kept == sorted(kept) and len(kept) == len(set(kept)) == stats["kept"]

    order = {pr: k for k, pr in enumerate(zip(ref.part.tolist(), ref.row.tolist()))}
    selected = set(order)
    assert set(kept) <= selected
    removed_exact, removed = selected - set(ref.kept), selected - set(kept)
    recall = len(removed & removed_exact) / len(removed_exact)
    across = straddling(ref, assigned_clusters(out), COSINE)
    print(f"recall {recall:.4f} of {len(removed_exact)} pairs the exact greedy removes ({across} with their "
          f"duplicates only in other clusters); removed {len(removed)}; boundary pass: "
          f"{stats['stages']['boundary_rows']} rows, {stats['stages']['boundary_dropped']} dropped")
    assert across > 0, "no planted duplicate straddles a cluster boundary: the data tests nothing"
    assert recall >= 0.98 and stats["dropped_exact_duplicate"] == int(ref.exact.sum())

    emb = ref.embeddings.astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keep = emb[[order[pr] for pr in kept]]
    dropped = np.array([order[pr] for pr in sorted(removed)])
    closest = np.concatenate([(emb[dropped[i:i + 1024]] @ keep.T).max(axis=1) for i in range(0, len(dropped), 1024)])
    assert (closest >= COSINE).all(), f"{(closest < COSINE).sum()} dropped pairs have no kept pair that close"
    return stats


def test_semantic_dedup_keeps_what_the_exact_greedy_keeps(scored, tmp_path, redis_url, start_worker):
    # given: a scored output with planted duplicates, and a worker
    scored_uri, where = scored
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    start_worker(queue, env)

    # when: it is curated on the workers (several clusters)
    status = submit(scored_uri, tmp_path / "out", queue, env)

    # then: the job succeeded in several clusters, with a boundary pass that dropped pairs
    assert status["state"] == "succeeded", status
    stats = check_quality(scored_uri, where, tmp_path / "out", PAIRS)
    plan = load_plan(open_storage(str(tmp_path / "out")))
    assert stats["stages"]["clusters"] == plan.clusters >= 10 and stats["stages"]["clusters_per_task"] == 2
    assert stats["stages"]["tasks"]["dedup"] == stats["stages"]["tasks"]["boundary"] == plan.groups
    assert plan.groups == -(-plan.clusters // 2) > 1


def test_duplicates_that_all_straddle_cluster_boundaries(tmp_path, redis_url, start_worker):
    # given: a harsh set: every planted group half-way between two topics, in clusters of 500
    scored_uri, where = write_scored(tmp_path / "harsh", plant(PAIRS, seed=11, boundary_share=1.0), SHARDS)
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    start_worker(queue, env)

    # when: it is curated on the workers
    args = ["submit", "shards", "--scored", scored_uri, "--output", str(tmp_path / "out"), "--top-fraction", "0.9",
            "--dedup-cosine", str(COSINE), "--dedup-exact", "--cluster-size", "500", "--queue", queue, "--wait",
            "--json"]
    result = run_cli(*args, env=env, timeout=600)

    # then: the boundary pass brings recall to >= 98% of the exact greedy's, precision still 1.0
    assert result.returncode == 0 and json.loads(result.stdout)["state"] == "succeeded", result.stderr
    stats = check_quality(scored_uri, where, tmp_path / "out", PAIRS)
    assert stats["stages"]["boundary_dropped"] > 0


def test_exact_dedup_hashes_older_outputs_from_their_source_tars(tmp_path, redis_url, start_worker):
    # given: a scored output written before the image_hash column existed, with exact duplicates
    planted = plant(3_000, dim=32, seed=3, exact_share=0.05)
    scored_uri, where = write_scored(tmp_path / "old", planted, 3, hashes=False)
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    start_worker(queue, env)

    # when: it is curated with --dedup-exact only (rows routed by hash, several tasks)
    result = run_cli("submit", "shards", "--scored", scored_uri, "--output", str(tmp_path / "out"), "--min-score", "-1",
                     "--dedup-exact", "--cluster-size", "400", "--queue", queue, "--wait", "--json", env=env)

    # then: exactly one pair per distinct image is kept, the best-scored one, as the exact reference
    assert result.returncode == 0, result.stderr
    kept = kept_rows(tmp_path / "out", where)
    images = [planted.image[i * 1000 + r] for i, r in kept]
    assert len(images) == len(set(images)) == len(set(planted.image.tolist()))
    best: dict[int, tuple] = {}
    for k, (i, r) in enumerate(where[key] for key in sorted(where)):
        n = i * 1000 + r
        best[planted.image[n]] = min(best.get(planted.image[n], (np.inf,)), (-planted.scores[n], i, r))
    assert kept == sorted((i, r) for _, i, r in best.values())


def _kill_on_stage_start(worker, stage: str) -> tuple[str, int]:
    """SIGKILL the worker's process group as soon as its log shows a task of ``stage`` starting."""
    found: list[tuple[str, int]] = []

    def started() -> bool:
        found[:] = [(m.group(1), int(m.group(2))) for m in STAGE_START.finditer(worker.log()) if m.group(3) == stage]
        return bool(found)

    wait_for(started, 300, f"a {stage} task to start", interval_s=0.01)
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    return found[0]


_REFERENCE: dict[str, dict[str, bytes]] = {}


def _reference(scored_uri: str, tmp_path: Path, env: dict[str, str], start_worker) -> dict[str, bytes]:
    """The fault-free output (one run per module, on its own queue and worker), with the output's own
    paths made relative: a byte-identical run writes the same files with the same bytes."""
    if scored_uri not in _REFERENCE:
        queue = f"ref-{uuid.uuid4().hex[:8]}"
        worker = start_worker(queue, env)
        assert submit(scored_uri, tmp_path / "out", queue, env)["state"] == "succeeded"
        worker.stop()
        _REFERENCE[scored_uri] = outputs(tmp_path / "out")
        for p in sorted((tmp_path / "out").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (tmp_path / "out").rmdir()
    return _REFERENCE[scored_uri]


@pytest.mark.parametrize("stage", ["assign", "dedup", "boundary"])
def test_sigkill_during_a_stage_gives_the_fault_free_output(stage, scored, tmp_path, redis_url, start_worker):
    # given: the fault-free output, and a job whose worker is killed as a task of ``stage`` starts
    scored_uri, _ = scored
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url, CLIPBATCH_VISIBILITY_TIMEOUT="5")
    reference = _reference(scored_uri, tmp_path, env, start_worker)
    doomed = start_worker(queue, env)
    job = submit(scored_uri, tmp_path / "out", queue, env, wait=False)["job_id"]
    job_id, killed = _kill_on_stage_start(doomed, stage)
    assert job_id == job
    plan = load_plan(open_storage(str(tmp_path / "out")))
    done = set(commit.list_markers(open_storage(str(tmp_path / "out"))))
    left = [i for i in range(plan.base(stage), plan.base(stage) + plan.size(stage)) if i not in done]
    assert left, f"every {stage} task committed before the kill: no fault was injected"

    # when: another worker takes over (the killed task's message comes back after the visibility timeout)
    survivor = start_worker(queue, env)
    result = run_cli("status", job, "--watch", "--json", env=env, timeout=600)

    # then: the job succeeded, the stage's tasks without a commit (the one killed among them, unless it had
    # committed: stage tasks take milliseconds) ran again, and the output is byte-identical
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "succeeded"
    assert set(left) <= starts(survivor.log()) and (killed in done or killed in left)
    assert outputs(tmp_path / "out") == reference


def test_duplicate_chaining_messages_and_resubmits_change_nothing(scored, tmp_path, redis_url, start_worker):
    # given: a finished job, with two worker processes
    scored_uri, _ = scored
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    reference = _reference(scored_uri, tmp_path, env, start_worker)
    workers = [start_worker(queue, env) for _ in range(2)]
    out = tmp_path / "out"
    job = submit(scored_uri, out, queue, env, wait=False)["job_id"]
    # a duplicate of the clusters task (the one that launches assign) while the job runs
    app = make_app(replace(Settings.from_env(), broker_url=redis_url))
    app.send_task(CURATE_STAGE, args=[job, 0, f"{out}#clusters=0", None], queue=queue)
    status = json.loads(run_cli("status", job, "--watch", "--json", env=env, timeout=600).stdout)
    assert status["state"] == "succeeded" and status["shards_done"] == status["shards_total"]
    assert outputs(out) == reference
    markers = commit.list_markers(open_storage(str(out)))

    # when: every stage's last task is delivered again after the end (each relaunches the next stage)
    plan = load_plan(open_storage(str(out)))
    for stage in ("clusters", "assign", "dedup", "boundary"):
        n = plan.size(stage) - 1
        app.send_task(CURATE_STAGE, args=[job, plan.base(stage) + n, f"{out}#{stage}={n}", None], queue=queue)
    time.sleep(1)
    wait_for(lambda: redis.Redis.from_url(redis_url).llen(queue) == 0, 120, "the duplicates to be taken")
    time.sleep(3)

    # then: nothing new was written or counted
    after = json.loads(run_cli("status", job, "--json", env=env).stdout)
    assert (after["state"], after["shards_done"], after["shards_total"]) == ("succeeded", status["shards_done"],
                                                                             status["shards_total"])
    assert commit.list_markers(open_storage(str(out))) == markers and outputs(out) == reference

    # and: a resubmit after success runs nothing
    before = [starts(w.log()) for w in workers]
    again = submit(scored_uri, out, queue, env)
    assert again["state"] == "succeeded" and again["shards_skipped"] == again["shards_total"] == status["shards_total"]
    assert [starts(w.log()) for w in workers] == before and outputs(out) == reference


def test_every_stage_goes_through_the_queue_window(scored, tmp_path, redis_url, start_worker):
    # given: the fault-free output, and a queue window of 2 messages (assign has 6 tasks, write 5)
    scored_uri, _ = scored
    queue = f"cur-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, CLIPBATCH_QUEUE_WINDOW="2")
    reference = _reference(scored_uri, tmp_path, env, start_worker)
    start_worker(queue, env)
    # when: the job runs, the queue's length sampled all along
    job = submit(scored_uri, tmp_path / "out", queue, env, wait=False)["job_id"]
    r, longest, deadline = redis.Redis.from_url(redis_url), 0, time.monotonic() + 600
    while not (tmp_path / "out" / "_job.json").exists():
        assert time.monotonic() < deadline, "the job did not end"
        longest = max(longest, r.llen(queue))
        time.sleep(0.005)
    # then: it succeeded with the fault-free output, and the broker never held more than the window
    status = json.loads(run_cli("status", job, "--json", env=env).stdout)
    assert status["state"] == "succeeded" and status["shards_done"] == status["shards_total"]
    assert outputs(tmp_path / "out") == reference
    assert 1 <= longest <= 2, longest
    assert r.llen(keys.job_pending(job)) == 0


def test_resubmit_after_redis_state_loss_runs_only_what_is_missing(scored, tmp_path, redis_url, start_worker):
    # given: the fault-free output, and a job killed as its dedup stage starts
    scored_uri, _ = scored
    queue, env = f"cur-{uuid.uuid4().hex[:8]}", service_env(redis_url)
    reference = _reference(scored_uri, tmp_path, env, start_worker)
    doomed = start_worker(queue, env)
    submit(scored_uri, tmp_path / "out", queue, env, wait=False)
    _kill_on_stage_start(doomed, "dedup")

    # when: Redis loses its state, and the job is resubmitted to a fresh worker
    redis.Redis.from_url(redis_url).flushdb()
    write_base = load_plan(open_storage(str(tmp_path / "out"))).base("write")
    missing = set(range(write_base))
    missing -= set(commit.list_markers(open_storage(str(tmp_path / "out"))))
    fresh = start_worker(queue, env)
    status = submit(scored_uri, tmp_path / "out", queue, env)

    # then: only the tasks without a commit ran (and then the write stage), and the output is the same
    assert status["state"] == "succeeded"
    ran = starts(fresh.log())
    assert {i for i in ran if i < write_base} == missing and missing
    assert outputs(tmp_path / "out") == reference
