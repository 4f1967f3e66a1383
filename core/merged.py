"""The whole output's shard statistics, merged and saved at a job's end (``_report/merged.json``), so
that the next job's end reads one file instead of every shard's: saved − the old stats of the shards
it rescored + the shards it counted (merged in Redis as they were counted, ``JobStore.report_done``).

``covers`` names every shard the totals hold, by index: ``[attempt, files, min, max, ok, failed]``
(``files`` a bit mask over ``ROLES``; the score bounds, since a minimum cannot be subtracted). Anything
that does not add up raises ``Stale``, and the job's end merges every shard's stats instead.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from clipbatch.core import layout
from clipbatch.core.scores import consistent, merge, subtract
from clipbatch.core.storage import Storage

VERSION = 1
ROLES = ("img", "text", "metadata", "errors", "stats")  # keys of layout.embed_files, one bit each
ATTEMPT, FILES, LOW, HIGH, OK, FAILED = range(6)


class Stale(ValueError):
    """The saved totals cannot be trusted for this job's end: merge every shard's stats instead."""


@dataclass
class Totals:
    """Merged statistics over the shards ``covers`` names."""

    covers: dict[int, list[Any]] = field(default_factory=dict)
    merged: dict[str, Any] = field(default_factory=lambda: merge([]))
    reasons: Counter = field(default_factory=Counter)

    def samples(self) -> tuple[int, int]:
        """(embedded, errors) over the covered shards."""
        return sum(c[OK] for c in self.covers.values()), sum(c[FAILED] for c in self.covers.values())


def file_mask(index: int, files: Iterable[str]) -> int:
    """The marker's files as a bit mask over ``ROLES``; -1 when it names a file of no role."""
    names = layout.embed_files(index)
    bits = {names[role]: 1 << bit for bit, role in enumerate(ROLES)}
    files = list(files)
    return sum(bits[f] for f in files) if all(f in bits for f in files) else -1


def mask_files(index: int, mask: int) -> list[str]:
    names = layout.embed_files(index)
    return [names[role] for bit, role in enumerate(ROLES) if mask >> bit & 1]


def shard_record(marker: dict[str, Any], stats: dict[str, Any]) -> list[Any]:
    """What ``covers`` keeps of one committed shard."""
    hist = stats.get("clip_score") or {}
    return [marker["attempt"], file_mask(marker["index"], marker["files"]), hist.get("min"), hist.get("max"),
            int(marker["samples_ok"]), int(marker["samples_failed"])]


def digest(pairs: Iterable[tuple[int, Any]]) -> str:
    """One hash of (index, attempt) pairs, in any order: which commits a set of shards holds."""
    text = "\n".join(f"{i}:{a}" for i, a in sorted(pairs, key=lambda p: p[0]))
    return hashlib.sha256(text.encode()).hexdigest()


def from_stats(markers: dict[int, dict[str, Any]], stats: dict[int, dict[str, Any]]) -> Totals:
    """Totals over every committed shard whose stats were read (the full merge)."""
    found = {i: s for i, s in stats.items() if i in markers}
    reasons: Counter = Counter()
    for s in found.values():
        reasons.update(s.get("error_reasons", {}))
    return Totals({i: shard_record(markers[i], s) for i, s in found.items()},
                  merge(s["clip_score"] for s in found.values() if "clip_score" in s), reasons)


def load(storage: Storage) -> Totals:
    """The totals the last job's end saved; ``Stale`` when there are none or they are unreadable."""
    try:
        raw = json.loads(storage.read(layout.MERGED))
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}")
        covers = {int(i): list(c) for i, c in raw["covers"].items()}
        if any(len(c) != 6 for c in covers.values()):
            raise ValueError("a covers entry is not [attempt, files, min, max, ok, failed]")
        merged = {k: raw["merged"][k] for k in ("count", "sum", "sumsq", "bins", "at_least")}
        return Totals(covers, {**merged, "min": None, "max": None}, Counter(raw["reasons"]))
    except FileNotFoundError:
        raise Stale(f"no {layout.MERGED}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Stale(f"{layout.MERGED} is corrupt ({type(exc).__name__}: {exc})") from None


def save(storage: Storage, totals: Totals) -> None:
    merged = {k: totals.merged[k] for k in ("count", "sum", "sumsq", "bins", "at_least")}
    data = {"version": VERSION, "covers": {str(i): c for i, c in sorted(totals.covers.items())},
            "merged": merged, "reasons": dict(totals.reasons)}
    storage.write(layout.MERGED, json.dumps(data, separators=(",", ":")).encode())


def with_bounds(totals: Totals) -> dict[str, Any]:
    """The merged histogram with min and max taken over the covered shards' own."""
    lows = [c[LOW] for c in totals.covers.values() if c[LOW] is not None]
    highs = [c[HIGH] for c in totals.covers.values() if c[HIGH] is not None]
    return {**totals.merged, "min": min(lows, default=None), "max": max(highs, default=None)}


def replaced(saved: Totals, counted: dict[int, dict[str, Any]]) -> list[int]:
    """Shards this job committed anew over a commit the saved totals hold: their old stats must go."""
    return sorted(i for i, rec in counted.items() if i in saved.covers and not rec["before"])


@dataclass
class JobShards:
    """What Redis holds of one job: its done set, the shards it counted and their merged stats."""

    done: set[int]
    counted: dict[int, dict[str, Any]]  # index -> {"record": [...], "before": committed before this job}
    added: Totals  # the shards counted by this job (not those committed before it), merged
    kept_digest: str | None  # digest() of the shards its plan kept, taken when the job was created
    samples: tuple[int, int]  # the job record's samples_done, samples_failed


def advance(saved: Totals, job: JobShards, old_stats: dict[int, dict[str, Any]], modality: str) -> Totals:
    """The totals after this job: saved − old stats of the shards it replaced + the shards it counted.

    Raises ``Stale`` unless the saved totals hold exactly the commits the job's plan kept and the
    result adds up to the job record's samples."""
    kept = job.done - set(job.counted)
    if not kept <= set(saved.covers) or digest((i, saved.covers[i][ATTEMPT]) for i in kept) != job.kept_digest:
        raise Stale("the saved totals are not those of the commits this job's plan kept")
    for i, rec in job.counted.items():
        if rec["before"] and saved.covers.get(i, [None])[ATTEMPT] != rec["record"][ATTEMPT]:
            raise Stale(f"shard {i} was committed before this job, but not as the saved totals hold it")
    merged, reasons = saved.merged, Counter(saved.reasons)
    for i in replaced(saved, job.counted):
        old = old_stats.get(i)
        if old is None or old.get("attempt") != saved.covers[i][ATTEMPT]:
            raise Stale(f"the old stats of rescored shard {i} are not kept")
        merged = subtract(merged, old["clip_score"]) if "clip_score" in old else merged
        reasons.subtract(old.get("error_reasons", {}))
    reasons.update(job.added.reasons)
    if min(reasons.values(), default=0) < 0:
        raise Stale("the old stats of the rescored shards hold error reasons the saved totals do not")
    covers = {**{i: c for i, c in saved.covers.items() if i not in job.done or i in kept},
              **{i: rec["record"] for i, rec in job.counted.items()}}
    result = Totals(covers, merge([merged, job.added.merged]), +reasons)
    _check(result, job, kept, saved, modality)
    return result


def _check(result: Totals, job: JobShards, kept: set[int], saved: Totals, modality: str) -> None:
    """Counts that must add up: the job record's samples, the error reasons, the scored samples."""
    mine = [result.covers[i] for i in job.done]
    if (sum(c[OK] for c in mine), sum(c[FAILED] for c in mine)) != job.samples:
        raise Stale(f"the totals hold {sum(c[OK] for c in mine)} embedded over the job's shards, "
                    f"the job record {job.samples[0]}")
    ok, failed = result.samples()
    if sum(result.reasons.values()) != failed or not consistent(result.merged):
        raise Stale("the merged error reasons or score histogram do not add up")
    if result.merged["count"] != (ok if modality == "pairs" else 0):
        raise Stale(f"the merged histogram holds {result.merged['count']} scores for {ok} embedded pairs")
