"""The seeded search of tests/test_interleavings.py for the job kinds of several stages: curation and
fine-tune jobs through the same faults (overlapping submits, duplicate messages of any committed task,
worker SIGKILLs, cancels, Redis state loss), plus dead-lettered tasks (an input hidden for a while) and,
for curation, a rescore of the scored input while jobs run. Outputs are on S3, on moto and on SeaweedFS
(inputs local). Then every job is let end, the output is resubmitted to success, and each kind's
invariant is checked from storage alone:

* curation: every output whose job reports ``succeeded`` holds the bytes of a fault-free run on the
  scored data its plan pinned (a rescore mid-run fails the job instead; a resubmit then goes to a new
  output, as the refusal says);
* fine-tune: steps 0..n-1 committed once each, every step trained on its predecessor's committed
  checkpoint (the chain of markers), and the final checkpoint is the last step's.

``CLIPBATCH_INTERLEAVING_STAGE_SEEDS`` (default 1 per kind and server), ``CLIPBATCH_INTERLEAVING_STEPS``
and ``_FIRST_SEED`` size it; ``make soak`` runs both files at length.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import redis

from clipbatch.core import commit, layout
from clipbatch.core.config import Settings
from clipbatch.core.specs import FinetuneSpec, ModelSpec, SpecError, TrainShardsSpec
from clipbatch.core.stages import task_of
from clipbatch.core.storage import open_storage
from clipbatch.orchestration.client import Client
from clipbatch.sample_data import shape_collection
from tests.conftest import S3_SERVERS, service_env
from tests.curation_data import plant, write_scored, write_shard
from tests.test_interleavings import VISIBILITY_TIMEOUT_S, client, fault

pytestmark = pytest.mark.integration

SEEDS = int(os.environ.get("CLIPBATCH_INTERLEAVING_STAGE_SEEDS", "1"))
FIRST_SEED = int(os.environ.get("CLIPBATCH_INTERLEAVING_FIRST_SEED", "0"))
STEPS = int(os.environ.get("CLIPBATCH_INTERLEAVING_STEPS", "8"))
OPERATIONS = ("submit", "submit", "duplicate", "duplicate", "kill", "cancel", "lose_redis", "hide", "pause")
CURATION = dict(top_fraction=0.8, dedup_cosine=0.95, dedup_exact=True, cluster_size=400, clusters_per_task=1,
                samples_per_shard=400)
PAIRS, SCORED_SHARDS = 1_500, 3


@dataclass
class World:
    rng: random.Random
    root: Path
    redis_url: str
    queue: str
    kind: str
    bucket: str
    outputs: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    hidden: list[tuple[Path, Path]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    tally: dict[str, int] = field(default_factory=dict)
    version: int = 0  # how often scored shard 2 was rescored (curation)

    def count(self, what: str) -> None:
        self.tally[what] = self.tally.get(what, 0) + 1


def spec(world: World, checkpoint: Path):
    if world.kind == "shards":
        return TrainShardsSpec(str(world.root / "scored"), world.outputs[-1], queue=world.queue, **CURATION)
    return FinetuneSpec(f"{world.root}/train/{{00000..00002}}.tar", world.outputs[-1],
                        ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=8, queue=world.queue)


def submit(world: World, checkpoint: Path) -> str | None:
    try:
        job = client(world).submit(spec(world, checkpoint))
    except SpecError as exc:
        if "rescored since" in str(exc):  # the refusal says: a new output
            world.outputs.append(f"s3://{world.bucket}/out{len(world.outputs)}")
            world.count("new_output")
            return None
        assert "one job per output" in str(exc), exc
        world.count("refused_busy")
        return None
    world.jobs.append(job.job_id)
    return job.job_id


def duplicate(world: World) -> str:
    """A duplicate message of a random committed task of the newest job (a stage's last task included)."""
    markers = commit.list_markers(open_storage(world.outputs[-1]))
    if not world.jobs or not markers:
        return "duplicate: nothing committed"
    index = world.rng.choice(sorted(markers))
    entry = (index, markers[index]["input"], None)
    client(world).app.send_task(task_of(world.kind, entry), args=[world.jobs[-1], *entry], queue=world.queue)
    world.count("stage_duplicates")
    return f"duplicate task {index}"


def hide(world: World) -> str:
    """Hide an input a task reads until the next operation: the tasks reading it now are dead-lettered."""
    if world.kind == "shards":
        victim = world.root / "scored" / layout.embed_files(world.rng.randrange(SCORED_SHARDS))["img"]
    else:
        victim = world.root / "train" / f"{world.rng.randrange(3):05d}.tar"
    if not victim.exists():
        return "hide: already hidden"
    hidden = victim.with_name(victim.name + ".hidden")
    victim.rename(hidden)
    world.hidden.append((hidden, victim))
    world.count("hidden")
    return f"hide {victim.name}"


def restore(world: World) -> None:
    for hidden, victim in world.hidden:
        hidden.rename(victim)
    world.hidden.clear()


def step(world: World, op: str, checkpoint: Path, workers: list, start_worker, env) -> None:
    restore(world)
    if op == "submit":
        world.log.append(f"submit -> {submit(world, checkpoint)}")
    elif op == "duplicate":
        world.log.append(duplicate(world))
    elif op == "hide":
        world.log.append(hide(world))
    elif op == "rescore":
        world.log.append(rescore(world))
    else:
        fault(world, op, lambda: client(world), workers, start_worker, env)


def settle(world: World, checkpoint: Path, timeout_s: float = 400) -> dict:
    """Let every job end (each must: a hung job times out here), then resubmit until one succeeds."""
    restore(world)
    deadline = time.monotonic() + timeout_s
    c = client(world)
    while time.monotonic() < deadline:
        job_id = submit(world, checkpoint)
        if job_id is None:
            time.sleep(1)
            continue
        status = c.job(job_id).wait(timeout_s=max(1.0, deadline - time.monotonic()))
        world.log.append(f"settle {job_id}: {status['state']}")
        if status["state"] == "succeeded":
            return status
    raise AssertionError(f"no job succeeded within {timeout_s}s (a job that never ends?)")


# ---- each kind's invariant, from storage alone ----

def curated(output: str) -> dict[str, bytes]:
    """What a curation job leaves but markers, its record, temporaries and the pins (attempt ids)."""
    storage = open_storage(output)
    skip = (layout.MARKER_DIR + "/", layout.TMP_DIR + "/", layout.JOB_FILE, layout.CURATION_PINS)
    return {key: storage.read(key) for key in sorted(storage.list("")) if not key.startswith(skip)}


def set_version(root: Path, version: int, attempt: str) -> None:
    """Scored shard 2 as planted (version 0) or as rescored at ``version``, committed as ``attempt``."""
    if version == 0:
        planted = plant(PAIRS, seed=11, boundary_share=0.3)
        rows = np.array_split(np.arange(PAIRS), SCORED_SHARDS)[2]
        emb, scores, image = planted.emb[rows], planted.scores[rows], planted.image[rows]
    else:
        planted = plant(PAIRS // SCORED_SHARDS, seed=100 + version % 2, boundary_share=0.0)
        emb, scores, image = planted.emb, planted.scores, planted.image
    open_storage(str(root / "scored")).delete(layout.marker(2))
    write_shard(root, 2, emb, scores, image, attempt=attempt)


def rescore(world: World) -> str:
    """A score job rescores scored shard 2: other scores, a new commit (its old marker dropped first)."""
    world.version += 1
    set_version(world.root, world.version, f"v{world.version}")
    world.count("rescores")
    return f"rescore shard 2 (v{world.version})"


def reference(world: World, output: str, version: int, start_worker) -> dict[str, bytes]:
    """A fault-free run on the same paths (paths are part of some files' bytes), scored shard 2 at
    ``version``: the output is emptied and a fresh job on a fresh worker writes it anew."""
    set_version(world.root, version, f"ref{version}")
    storage = open_storage(output)
    for key in storage.list(""):
        storage.delete(key)
    queue = f"ref-{uuid.uuid4().hex[:6]}"
    worker = start_worker(queue, service_env(world.redis_url))
    c = Client(replace(Settings.from_env(), broker_url=world.redis_url))
    job = c.submit(TrainShardsSpec(str(world.root / "scored"), output, queue=queue, **CURATION))
    assert job.wait(timeout_s=300)["state"] == "succeeded", "the fault-free run failed"
    worker.stop()
    return curated(output)


def check_curation(world: World, start_worker) -> int:
    checked = 0
    for output in world.outputs:
        storage = open_storage(output)
        try:
            record = json.loads(storage.read(layout.JOB_FILE))
        except FileNotFoundError:
            continue
        if record["state"] != "succeeded":
            continue
        pinned = json.loads(storage.read(layout.CURATION_PINS))["2"]
        version = 0 if pinned == "synthetic2" else int(pinned.removeprefix("v"))
        found = curated(output)
        assert found == reference(world, output, version, start_worker), \
            f"{output}: not the fault-free bytes for scored shard 2 at {pinned}"
        checked += 1
    assert checked, "no output holds a succeeded job"
    return checked


def check_finetune(world: World, status: dict) -> None:
    output = open_storage(world.outputs[-1])
    markers = commit.list_markers(output)
    steps = status["shards_total"]
    assert sorted(markers) == list(range(steps)), sorted(markers)
    for k in range(1, steps):
        assert markers[k]["from_attempt"] == markers[k - 1]["attempt"], f"step {k} did not train on step {k - 1}'s commit"
        assert json.loads(output.read(layout.step_metrics(k)))["attempt"] == markers[k]["attempt"]
    assert output.read(layout.FINAL_CHECKPOINT) == output.read(layout.checkpoint(steps - 1))
    assert not [k for k in output.list("") if k.startswith(layout.TMP_DIR + "/")], "staged files left behind"


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
@pytest.mark.parametrize("kind", ["shards", "finetune"])
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
def test_any_interleaving_keeps_each_kinds_invariant(kind, seed, redis_url, s3_endpoint, bucket, tmp_path, checkpoint,
                                                     start_worker):
    # given: two real workers, the job's input, and a seeded sequence of operations
    base, _, db = redis_url.rpartition("/")
    # flushed by lose_redis: not the suite's database, nor the embed search's (its + 3, + 4)
    own_redis = f"{base}/{(int(db) - 2 - seed % 2) % 16}"
    redis.Redis.from_url(own_redis).flushdb()
    world = World(random.Random(seed), tmp_path, own_redis, f"ils-{seed}-{uuid.uuid4().hex[:6]}", kind, bucket,
                  outputs=[f"s3://{bucket}/out"])
    if kind == "shards":
        write_scored(tmp_path, plant(PAIRS, seed=11, boundary_share=0.3), SCORED_SHARDS)
    else:
        shape_collection(tmp_path / "train", per_class=3, shards=3, seed=seed)
    env = service_env(own_redis, CLIPBATCH_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S), CLIPBATCH_MAX_RETRIES="1")
    workers = [start_worker(world.queue, env) for _ in range(2)]
    operations = OPERATIONS + (("rescore",) if kind == "shards" else ())

    # when: the operations run, then every job is let end and the output is resubmitted to success
    ops = ["submit"] + [world.rng.choice(operations) for _ in range(STEPS - 1)]  # faults hit a running job
    try:
        for op in ops:
            step(world, op, checkpoint, workers, start_worker, env)
        status = settle(world, checkpoint)
        # then: the kind's invariant holds, from storage alone
        if kind == "shards":
            checked = check_curation(world, start_worker)
        else:
            check_finetune(world, status)
            checked = 1
    except AssertionError as exc:
        raise AssertionError(f"{kind} seed {seed} (rerun: CLIPBATCH_INTERLEAVING_FIRST_SEED={seed} "
                             f"CLIPBATCH_INTERLEAVING_SEEDS=1): {exc}\noperations: {world.log}") from None
    finally:
        restore(world)
    print(f"\n[interleaving {kind} seed {seed}] outputs checked {checked}, {world.tally}, jobs {len(world.jobs)}: "
          f"{world.log}")
    shutil.rmtree(tmp_path / "train", ignore_errors=True)
