"""Training-shard curation as a chain of stages on the workers (docs/curation.md).

Every stage task commits at the output's root with the commit protocol, at a global index::

    0                  clusters  k-means centroids from a bounded random sample (one task)
    1 .. S             assign    scored shard -> rows >= threshold -> nearest centroid -> one file per
                                 group of clusters reached
    1+S .. S+G         dedup     group of clusters -> per cluster: exact hash, then greedy cosine by
                                 descending score -> keep lists; kept rows near a boundary -> per group
                                 of the pair's lower cluster
    1+S+G .. S+G+B     boundary  group g -> each pair (a in g, b > a): exact greedy over its rows -> changes
    1+S+G+B+j          write     training tar j from the keep lists and the changes, in source order

The K clusters are dealt to G = ceil(K / clusters_per_task) tasks (groups of consecutive clusters), so the
files between two stages number S x G, not S x K. B is G with semantic dedup over several clusters, else 0
(the stage is skipped).

The producer plans (threshold, S scored shards, K clusters) in O(scored shards) and enqueues the
first stage not yet complete. The stage engine (core/stages.py, core/curation_stages.py) launches
each next one, once: the plan of a stage is a function of storage alone. Only the write stage's size
(tars) is learnt on the way, from the dedup markers. This module is pure storage and numpy: no
faiss, no Celery.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import pyarrow.parquet as pq

from clipbatch.core import commit, layout
from clipbatch.core.pins import check_pins_unchanged, pins
from clipbatch.core.scores import BINS, LOW, WIDTH, merge, quantile
from clipbatch.core.specs import SpecError, TrainShardsSpec
from clipbatch.core.storage import Storage, open_storage

STAGES = ("clusters", "assign", "dedup", "boundary", "write")
# Routing of a selected row to its dedup task: by nearest centroid (semantic dedup), by image hash
# (exact dedup alone: identical bytes meet in one task wherever they are), or by scored shard (no dedup).
ROUTES = ("cluster", "hash", "part")


@dataclass(frozen=True)
class Tuning:
    """Curation's tuning constants, in one place for every stage (the measurements behind them:
    docs/curation.md)."""

    sample_per_cluster: int = 40  # k-means sample: this many selected rows per centroid ...
    sample_max: int = 100_000  # ... at most
    sample_parts: int = 64  # read from at most this many scored shards (a random choice)
    split_factor: int = 4  # a cluster over this many times the cluster size is split (sub-k-means) in its dedup task
    task_rows: int = 100_000  # clusters per dedup task, by default: about this many selected rows in all
    boundary_sigmas: float = 3.0  # boundary rows: nearest and second centroid within this many sigmas
    kmeans_iterations: int = 20
    candidates: int = 4  # centroids faiss proposes per row, re-ranked exactly (workers/curation.nearest)
    seed: int = 1234  # of the k-means samples and initial centroids


TUNING = Tuning()


def boundary_margin(cosine: float, dim: int) -> float:
    """How close a row's second centroid must be to its nearest for the row to join the boundary pass.

    Two rows at cosine ``c`` differ by a vector of length sqrt(2 - 2c); its component along the difference
    of two unit centroids (length <= sqrt 2) has a standard deviation of sqrt(2 (2 - 2c) / dim) when its
    direction is random, and the gap between the two centroid similarities moves by that much. Rows whose
    gap is within ``boundary_sigmas`` of it are the ones whose duplicates may sit across the boundary. (The
    worst case, 2 sqrt(2 - 2c), would take nearly every row: the pass is an approximation, measured.)"""
    return TUNING.boundary_sigmas * math.sqrt(2.0 * (2.0 - 2.0 * cosine) / max(1, dim))


@dataclass(frozen=True)
class CurationPlan:
    """What every stage needs to know, fixed by the producer and saved in ``_curation/plan.json``."""

    scored: str
    threshold: float
    parts: int  # S: scored shards with pairs (their indices in parts.json)
    clusters: int  # K
    route: str
    total: int  # scored pairs
    selected_estimate: int
    dedup_cosine: float | None
    dedup_exact: bool
    cluster_size: int
    samples_per_shard: int
    clusters_per_task: int  # a dedup (and boundary) task takes this many consecutive clusters: a group

    @property
    def groups(self) -> int:
        """G: the dedup stage's tasks."""
        return -(-self.clusters // self.clusters_per_task)

    def group_of(self, cluster: np.ndarray | int) -> np.ndarray | int:
        return cluster // self.clusters_per_task

    @property
    def boundary(self) -> int:
        """Tasks of the boundary pass: one per group with semantic dedup over several clusters, else none."""
        return self.groups if self.route == "cluster" and self.clusters > 1 else 0

    def base(self, stage: str) -> int:
        """The global index of the stage's first task."""
        dedup = 1 + self.parts
        return {"clusters": 0, "assign": 1, "dedup": dedup, "boundary": dedup + self.groups,
                "write": dedup + self.groups + self.boundary}[stage]

    def size(self, stage: str) -> int | None:
        """Tasks in the stage; None for the write stage (known once dedup and boundary are done)."""
        return {"clusters": 1, "assign": self.parts, "dedup": self.groups, "boundary": self.boundary}.get(stage)

    def next_stage(self, stage: str) -> str:
        """The stage after ``stage`` that has tasks (the write stage always follows)."""
        return next(s for s in STAGES[STAGES.index(stage) + 1:] if self.size(s) != 0)

    def stage_of(self, index: int) -> str:
        return next(s for s in reversed(STAGES) if index >= self.base(s))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()


def task_input(output: str, stage: str, n: int) -> str:
    """A stage task's input: the output URI with the stage and its number as a fragment (unique per task)."""
    return f"{output}#{stage}={n}"


def parse_input(uri: str) -> tuple[str, str, int]:
    """``task_input``'s inverse: (output, stage, number)."""
    output, _, fragment = uri.rpartition("#")
    stage, _, n = fragment.partition("=")
    if stage not in STAGES or not n.isdigit():
        raise ValueError(f"{uri!r} is not a curation task's input")
    return output, stage, int(n)


def load_plan(output: Storage) -> CurationPlan:
    """The saved plan."""
    return CurationPlan(**json.loads(output.read(layout.CURATION_PLAN)))


def load_parts(output: Storage) -> list[int]:
    return json.loads(output.read(layout.CURATION_PARTS))


def _selected_estimate(hist: dict[str, Any], threshold: float) -> int:
    first = int(np.clip((threshold - LOW) / WIDTH, 0, BINS - 1))
    return sum(c for b, c in hist["bins"].items() if int(b) >= first)


def _route(spec: TrainShardsSpec) -> str:
    return "cluster" if spec.dedup_cosine is not None else "hash" if spec.dedup_exact else "part"


def plan_curation(spec: TrainShardsSpec, output: Storage) -> tuple[CurationPlan, dict[int, dict[str, Any]]]:
    """Threshold, scored shards and cluster count from the markers and stats files: O(scored shards).
    Saves the plan, refusing an output that holds another plan's tasks or another job's results;
    returns it with the output's markers (this plan's committed tasks)."""
    source = open_storage(spec.scored)
    markers = commit.list_markers(source)
    if not markers:
        raise SpecError("scored", f"{spec.scored} holds no committed shards")
    alone = sorted({m.get("modality", "pairs") for m in markers.values()} - {"pairs"})
    if alone:
        raise SpecError("scored", f"{spec.scored} holds {alone[0]}-only embeddings (--modality {alone[0]}), no "
                                  "pairs or clip_score; training shards are cut from a pairs output")
    parts = sorted(i for i, m in markers.items() if m["samples_ok"])
    if not parts:
        raise SpecError("scored", f"{spec.scored} holds no embedded pairs (every sample was an error)")
    if spec.dedup_cosine is not None:
        missing = [i for i in parts if layout.embed_files(i)["img"] not in markers[i]["files"]]
        if missing:
            raise SpecError("dedup_cosine", f"{spec.scored} has no image embeddings for shard {missing[0]} "
                                            "(scored with --no-embeddings); rescore with embeddings or drop the option")
    hist = merge(json.loads(source.read(layout.stats(i))).get("clip_score") or merge([]) for i in parts)
    if not hist["count"]:
        raise SpecError("scored", f"{spec.scored} has no clip_score; run a score job on it first")
    # a valid spec has exactly one of the two (TrainShardsSpec.validate)
    threshold = (float(spec.min_score) if spec.min_score is not None
                 else quantile(hist, 1.0 - cast(float, spec.top_fraction)))
    selected = _selected_estimate(hist, threshold)
    clusters = max(1, round(selected / spec.cluster_size)) if _route(spec) != "part" else max(1, len(parts))
    per_task = spec.clusters_per_task or max(1, TUNING.task_rows // spec.cluster_size)
    plan = CurationPlan(spec.scored, threshold, len(parts), clusters, _route(spec), hist["count"], selected,
                        spec.dedup_cosine, spec.dedup_exact, spec.cluster_size, spec.samples_per_shard,
                        min(per_task, clusters))
    return plan, _save_plan(output, spec.output, plan, parts, markers)


def _save_plan(output: Storage, uri: str, plan: CurationPlan, parts: list[int],
               scored: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    try:
        previous = load_plan(output)
    except FileNotFoundError:
        previous = None
    markers = commit.list_markers(output)
    pinned = pins(scored, parts)
    if markers:
        check_pins_unchanged(output, uri, pinned)
    if previous is not None and previous != plan and markers:
        raise SpecError("output", f"{uri} already holds shards of a different selection; use a new output")
    check_markers(plan, uri, markers)
    output.write(layout.CURATION_PINS, json.dumps(pinned, sort_keys=True).encode())
    output.write(layout.CURATION_PARTS, json.dumps(parts).encode())
    output.write(layout.CURATION_PLAN, plan.to_json())
    return markers


def stage_tasks(plan: CurationPlan, output: str, stage: str, count: int | None = None) -> list[tuple[int, str]]:
    """Every task of ``stage``: (global index, input). ``count``: the write stage's tars."""
    n = plan.size(stage) if count is None else count
    if n is None:
        raise ValueError(f"the {stage} stage's task count is known once it is planned: pass count")
    return [(plan.base(stage) + k, task_input(output, stage, k)) for k in range(n)]


def planned_input(output: Storage, output_uri: str, index: int) -> str | None:
    """The task the saved plan runs at ``index`` now, or None: none there, or a stage before its own is
    not committed yet (a stage reads what those wrote). How a worker tells a stage task it may run
    unsigned (core/signing.py derivable); FileNotFoundError when the plan is missing."""
    plan = load_plan(output)
    if index < 0:
        return None
    stage = plan.stage_of(index)
    n = index - plan.base(stage)
    size = plan.size(stage)
    if size is None:  # the write stage: its tars are known once planned (plan_write's summary)
        size = json.loads(output.read(layout.SELECTION_PLAN))["stages"]["tasks"]["write"]
    committed = {layout.marker_index(key) for key in output.list(layout.MARKER_DIR + "/")}
    if n >= size or not set(range(plan.base(stage))) <= committed:
        return None
    return task_input(output_uri, stage, n)


# ---- the write stage's plan: from the dedup markers, O(groups x scored shards) ----

def plan_write(output: Storage, plan: CurationPlan, markers: dict[int, dict[str, Any]]) -> int:
    """Cut the kept rows, in source order, into tars of ``samples_per_shard``; write one write plan per
    tar and the job's summary (sizes, per-stage counts). Deterministic bytes: safe to run twice."""
    parts = load_parts(output)
    dedup = [markers[plan.base("dedup") + g] for g in range(plan.groups)]
    boundary = [markers[plan.base("boundary") + g] for g in range(plan.boundary)]
    by_part: dict[int, list[tuple[int, int]]] = {}  # per scored shard: (dedup task, rows kept)
    for g, marker in enumerate(dedup):
        for part, n in marker["kept_parts"].items():
            by_part.setdefault(int(part), []).append((g, n))
    changes: dict[int, list[tuple[int, int]]] = {}  # per scored shard: (boundary task, rows back - rows dropped)
    for c, marker in enumerate(boundary):
        for part, (gone, back) in marker["changed_parts"].items():
            changes.setdefault(int(part), []).append((c, back - gone))
    counts = [(p, sum(n for _, n in by_part.get(p, ())) + sum(n for _, n in changes.get(p, ()))) for p in parts]
    kept = sum(n for _, n in counts)
    tars = math.ceil(kept / plan.samples_per_shard)
    entries: list[list[dict[str, Any]]] = [[] for _ in range(tars)]
    position = 0
    for part, n in counts:
        groups = sorted(g for g, _ in by_part.get(part, ()))
        changed = sorted(g for g, _ in changes.get(part, ()))
        start = 0
        while start < n:
            j, offset = divmod(position, plan.samples_per_shard)
            take = min(n - start, plan.samples_per_shard - offset)
            entries[j].append({"part": part, "groups": groups, "boundary": changed, "start": start,
                               "stop": start + take})
            start, position = start + take, position + take
    for j, entry in enumerate(entries):
        output.write(layout.write_plan(j), json.dumps({"scored": plan.scored, "parts": entry}, sort_keys=True).encode())
    _write_summary(output, plan, markers, dedup, boundary, kept, tars)
    return tars


def _write_summary(output: Storage, plan: CurationPlan, markers: dict[int, dict[str, Any]],
                   dedup: list[dict[str, Any]], boundary: list[dict[str, Any]], kept: int, tars: int) -> None:
    assign = [markers[plan.base("assign") + a] for a in range(plan.parts)]
    total, selected = sum(m["rows"] for m in assign), sum(m["selected"] for m in assign)
    exact, near = sum(m["exact_dropped"] for m in dedup), sum(m["near_dropped"] for m in dedup)
    across = sum(m["near_dropped"] for m in boundary)
    near += across
    sizes = {layout.training_shard(j): min(plan.samples_per_shard, kept - j * plan.samples_per_shard)
             for j in range(tars)}
    summary = {
        "scored": plan.scored, "threshold": plan.threshold, "dedup_cosine": plan.dedup_cosine,
        "dedup_exact": plan.dedup_exact, "samples_per_shard": plan.samples_per_shard,
        "total": total, "kept": kept, "dropped_by_score": total - selected, "dropped_as_duplicate": exact + near,
        "dropped_exact_duplicate": exact, "dropped_near_duplicate": near,
        "stages": {"route": plan.route, "clusters": plan.clusters, "cluster_size": plan.cluster_size,
                   "clusters_per_task": plan.clusters_per_task, "exact": plan.clusters == 1,
                   "largest_cluster": max((m["largest_cluster"] for m in dedup), default=0),
                   "split_clusters": sum(m["split_clusters"] for m in dedup),
                   "boundary_rows": sum(m["rows"] for m in boundary), "boundary_dropped": across,
                   "boundary_pairs": sum(m["pairs"] for m in boundary),
                   "largest_boundary_pair": max((m["largest_pair"] for m in boundary), default=0),
                   "tasks": {"clusters": 1, "assign": plan.parts, "dedup": plan.groups,
                             "boundary": plan.boundary, "write": tars}},
        "sizes": sizes,
    }
    output.write(layout.SELECTION_PLAN, json.dumps(summary, indent=2, sort_keys=True).encode())


def check_markers(plan: CurationPlan, output: str, markers: dict[int, dict[str, Any]]) -> None:
    """Every marker of the output is this plan's task at its index; else the output is another job's."""
    for index, marker in sorted(markers.items()):
        stage = plan.stage_of(index)
        expected = task_input(output, stage, index - plan.base(stage))
        if marker.get("kind") != "shards" or marker.get("input") != expected:
            raise SpecError("output", f"{output} holds other results (shard {index}: a {marker.get('kind')} job's, "
                                      f"of {marker.get('input')}); use a separate output for each job")


@dataclass(frozen=True)
class Resume:
    """Where a (re)submitted job starts: the first stage not complete (None: all done), the job's
    task total so far, that stage's tasks to enqueue and those already committed."""

    stage: str | None
    total: int
    todo: list[tuple[int, str]]
    committed: list[int]


def resume(plan: CurationPlan, output_uri: str, output: Storage, markers: dict[int, dict[str, Any]]) -> Resume:
    """From the markers alone (the write stage's plan is rewritten, identically, once dedup is done)."""
    total = plan.base("write")
    tars = None
    for stage in STAGES:
        if stage == "write":
            tars = plan_write(output, plan, markers)
            total += tars
        tasks = stage_tasks(plan, output_uri, stage, tars)
        todo = [(i, uri) for i, uri in tasks if i not in markers]
        if todo:
            return Resume(stage, total, todo, [i for i, _ in tasks if i in markers])
    return Resume(None, total, [], [])


def read_rows(storage: Storage, key: str) -> np.ndarray:
    """A structured npy written by a stage (no pickles)."""
    return np.load(io.BytesIO(storage.read(key)), allow_pickle=False)


def read_metadata(scored: Storage, part: int, columns: list[str]) -> dict[str, np.ndarray | list]:
    table = pq.read_table(io.BytesIO(scored.read(layout.embed_files(part)["metadata"])))
    missing = [c for c in columns if c not in table.column_names]
    if "clip_score" in missing:
        raise SpecError("scored", f"{scored.uri} has no clip_score column; run a score job on it first")
    return {c: (table.column(c).to_numpy() if c == "clip_score" else table.column(c).to_pylist())
            for c in columns if c not in missing}
