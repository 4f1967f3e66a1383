"""Every path a job writes, relative to its output root: the one place the output layout lives.

An embed/score output (what embedding-reader and autofaiss read)::

    img_emb/img_emb_{i}.npy  text_emb/text_emb_{i}.npy  metadata/metadata_{i}.parquet
    errors/errors_{i}.parquet  stats/{i}.json  _commits/{i:05d}.json  _job.json  report/...

``{i:05d}`` pads to five digits and grows past them (``_commits/123456.json``); whatever reads
these names parses the digits (``marker_index``) and orders by number, never by the name.

A training-shards output: ``{j:05d}.tar``, ``sizes.json``, ``stats.json``, and its stages' files
under ``_curation/`` (plan, centroids, per-cluster partitions, keep lists, per-tar write plans). A fine-tune output:
``checkpoints/step_{k:05d}.pt``, ``checkpoints/final.pt``, ``metrics/step_{k:05d}.json``.
Attempts stage their files under ``_tmp/{attempt}/`` until their marker wins (core/commit.py): one
bundle ``_tmp/{attempt}/_bundle.tar`` holding them all, or (large commits, and attempts of older
versions) each file at ``_tmp/{attempt}/{name}``.
"""
from __future__ import annotations

MARKER_DIR = "_commits"
TMP_DIR = "_tmp"
BUNDLE = "_bundle.tar"  # an attempt's staged files in one object
JOB_FILE = "_job.json"
REPORT_DIR = "report"
SUMMARY = f"{REPORT_DIR}/summary.json"
SCORES_PNG = f"{REPORT_DIR}/scores.png"
REPORT_PAGE = f"{REPORT_DIR}/index.html"
LOSS_PNG = f"{REPORT_DIR}/loss.png"
SIZES = "sizes.json"
SELECTION_STATS = "stats.json"
FINAL_CHECKPOINT = "checkpoints/final.pt"
PROBE_DIR = "_probe"  # submit's writability and conditional-put probes
SUPERSEDED_DIR = "_superseded"  # markers of shards being rescored, so their index survives a crash mid-plan
SELECTION_DIR = "_selection"  # a training-shards job's summary (sizes, per-stage counts), written by its write plan
SELECTION_PLAN = f"{SELECTION_DIR}/plan.json"
MERGED_DIR = "_report"  # the whole output's merged shard stats (core/merged.py), and what they replace
MERGED = f"{MERGED_DIR}/merged.json"
MARKER_INDEX = "_index/markers.jsonl.gz"  # a checked cache of the markers, so a plan need not read each (core/marker_index.py)
CURATION_DIR = "_curation"  # a training-shards job's stages: plan, centroids, partitions, keep lists (core/curation.py)
CURATION_PLAN = f"{CURATION_DIR}/plan.json"
CURATION_PARTS = f"{CURATION_DIR}/parts.json"  # the scored shards the assign stage reads, in task order
CURATION_PINS = f"{CURATION_DIR}/pins.json"  # scored shard -> the attempt of its commit the plan read
CENTROIDS = f"{CURATION_DIR}/clusters/centroids.npy"


def marker(index: int) -> str:
    return f"{MARKER_DIR}/{index:05d}.json"


def marker_index(key: str) -> int | None:
    """The shard index a marker key names, or None for a key that is not a marker."""
    return _index_in(MARKER_DIR, key)


def superseded_index(key: str) -> int | None:
    """The shard index a superseded marker's key names, or None for any other key."""
    return _index_in(SUPERSEDED_DIR, key)


def _index_in(folder: str, key: str) -> int | None:
    """``{folder}/{i}.json`` -> i, for any number of digits (five or more as written: past 99,999 too)."""
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if key.startswith(folder + "/") and name.endswith(".json") and stem.isascii() \
        and stem.isdigit() else None


def staged(attempt: str, name: str) -> str:
    return f"{TMP_DIR}/{attempt}/{name}"


def bundle(attempt: str) -> str:
    return staged(attempt, BUNDLE)


def embed_files(index: int) -> dict[str, str]:
    """The files of input shard ``index`` in an embed/score output, by role."""
    return {
        "img": f"img_emb/img_emb_{index}.npy",
        "text": f"text_emb/text_emb_{index}.npy",
        "metadata": f"metadata/metadata_{index}.parquet",
        "errors": f"errors/errors_{index}.parquet",
        "stats": stats(index),
    }


def stats(index: int) -> str:
    return f"stats/{index}.json"


def superseded(index: int) -> str:
    return f"{SUPERSEDED_DIR}/{index:05d}.json"


def replaced_stats(index: int) -> str:
    """The old stats of a shard being rescored, kept by the plan for the job's end to subtract."""
    return f"{MERGED_DIR}/replaced/{index:05d}.json"


def assigned_dir(group: int) -> str:
    return f"{CURATION_DIR}/assign/{group:05d}/"


def assigned(group: int, part: int) -> str:
    """The assign stage's rows of scored shard ``part`` that fall in a cluster of dedup task ``group``."""
    return f"{assigned_dir(group)}{part:05d}.npy"


def kept(group: int, part: int) -> str:
    """The dedup stage's keep list: the rows of scored shard ``part`` that dedup task ``group`` keeps."""
    return f"{CURATION_DIR}/dedup/{group:05d}/{part:05d}.npy"


def edge_dir(group: int) -> str:
    return f"{CURATION_DIR}/edge/{group:05d}/"


def edge(group: int, source: int) -> str:
    """Dedup task ``source``'s kept rows near a boundary whose lower cluster is in ``group``, for the boundary pass."""
    return f"{edge_dir(group)}{source:05d}.npy"


def boundary_changes(group: int, part: int) -> str:
    """The boundary pass's changes: the rows of scored shard ``part`` that boundary task ``group`` drops or
    brings back."""
    return f"{CURATION_DIR}/boundary/{group:05d}/{part:05d}.npy"


def write_plan(index: int) -> str:
    """What training shard ``index`` holds: per scored shard, a range of its kept rows."""
    return f"{CURATION_DIR}/write/{index:05d}.json"


def training_shard(index: int) -> str:
    return f"{index:05d}.tar"


def checkpoint(step: int) -> str:
    return f"checkpoints/step_{step:05d}.pt"


def step_metrics(step: int) -> str:
    return f"metrics/step_{step:05d}.json"
