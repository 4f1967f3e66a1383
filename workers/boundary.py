"""The boundary pass of curation (core/curation.py): near duplicates that k-means put in two different
clusters. The dedup stage leaves, per pair of clusters, the kept rows whose second centroid is almost as
close as the nearest, and the rows it dropped only for such rows; boundary task ``g`` takes each pair
(low, high) whose lower cluster is in its group of clusters in turn, and runs the greedy over it, by
descending score, anchors always kept.

Precision holds by construction: every row is in one pair at most, so the rows a pair keeps stay kept. A
kept row the pair drops has a kept row of the pair at the threshold; a dropped row comes back unless one of
the pair's kept rows is that close (the kept rows it was dropped for in its cluster are all in this pair); a
row dropped for kept rows of several pairs stays dropped, its closest one an anchor that no pair drops; the
rows outside any pair keep their fate and their reasons.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from clipbatch.core import layout
from clipbatch.core.curation import CurationPlan, read_rows
from clipbatch.core.results import Files
from clipbatch.core.selection import near_duplicates
from clipbatch.core.storage import Storage
from clipbatch.workers.curation import edge_dtype, normalised, npy, runs

CHANGE = np.dtype([("row", "<i4"), ("kept", "u1")])


def boundary_greedy(emb: np.ndarray, anchor: np.ndarray, cosine: float, block: int = 1024) -> np.ndarray:
    """The greedy in the given order, anchors kept whatever comes before them: True for the other rows at
    ``cosine`` or more from an anchor or from a row kept before them."""
    emb = normalised(emb)
    dropped = np.zeros(len(emb), bool)
    free = np.nonzero(~anchor)[0]
    close = np.zeros(len(free), bool)
    if anchor.any():
        for start in range(0, len(free), block):
            close[start:start + block] = (emb[free[start:start + block]] @ emb[anchor].T).max(axis=1) >= cosine
    dropped[free[close]] = True
    rest = free[~close]
    dropped[rest] = near_duplicates(emb[rest], cosine)
    return dropped


def boundary_pass(plan: CurationPlan, output: Storage, group: int) -> tuple[Files, dict[str, Any]]:
    """The boundary task of group ``group``: every pair (low, high) with ``low`` in the group that the dedup
    stage left rows for, one at a time; per scored shard, the rows whose fate changes (dropped, or back)."""
    found = [read_rows(output, key) for key in sorted(output.list(layout.edge_dir(group)))]
    every = np.concatenate(found) if found else np.zeros(0, edge_dtype(0))
    every, spans = runs(every, "lo", "hi")
    changed, largest = [], 0
    for start, stop in spans:
        rows = every[start:stop]  # one pair, in dedup order
        dropped = boundary_greedy(rows["emb"], rows["anchor"].astype(bool), plan.dedup_cosine)
        flip = dropped != rows["dropped"].astype(bool)
        change = np.zeros(int(flip.sum()), [("part", "<i4"), *CHANGE.descr])
        change["part"], change["row"], change["kept"] = rows["part"][flip], rows["row"][flip], ~dropped[flip]
        changed.append(change)
        largest = max(largest, len(rows))
    files, changed_parts = {}, {}
    gone = back = 0
    if changed:
        flips = np.concatenate(changed)
        for part in np.unique(flips["part"]).tolist():
            mine = flips[flips["part"] == part]
            mine = mine[np.argsort(mine["row"], kind="stable")]
            out = np.zeros(len(mine), CHANGE)
            out["row"], out["kept"] = mine["row"], mine["kept"]
            files[layout.boundary_changes(group, part)] = npy(out)
            back_here = int(mine["kept"].sum())
            changed_parts[str(part)] = [len(mine) - back_here, back_here]
            gone, back = gone + len(mine) - back_here, back + back_here
    record = {"rows": len(every), "pairs": len(changed), "largest_pair": largest, "near_dropped": gone - back,
              "dropped": gone, "back": back, "changed_parts": changed_parts}
    return files, record


def apply_changes(kept: np.ndarray, changes: list[np.ndarray]) -> np.ndarray:
    """A scored shard's kept rows (sorted) after the boundary pass: less the rows it dropped, plus those back."""
    if not changes:
        return kept
    every = np.concatenate(changes)
    kept = kept[~np.isin(kept, every["row"][every["kept"] == 0])]
    return np.union1d(kept, every["row"][every["kept"] == 1]).astype(kept.dtype)
