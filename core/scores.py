"""Mergeable score histograms: per-shard counts on a fine grid, merged into a job report
without ever loading all scores onto one machine."""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

LOW, HIGH = -1.0, 1.0
BINS = 4000  # 0.0005 wide: a quantile read off the merged histogram is within 0.00025 of the exact one
WIDTH = (HIGH - LOW) / BINS
THRESHOLDS = (0.20, 0.25, 0.28, 0.30)
QUANTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
DISPLAY_WIDTH = 0.01


def histogram(scores: np.ndarray) -> dict[str, Any]:
    """The per-shard summary: sparse fine-grid counts plus exact moments and threshold counts."""
    scores = np.asarray(scores, dtype=np.float64)
    idx = np.clip(((scores - LOW) / WIDTH).astype(np.int64), 0, BINS - 1)
    bins, counts = np.unique(idx, return_counts=True)
    return {
        "count": int(scores.size),
        "sum": float(scores.sum()),
        "sumsq": float((scores**2).sum()),
        "min": float(scores.min()) if scores.size else None,
        "max": float(scores.max()) if scores.size else None,
        "bins": {str(int(b)): int(c) for b, c in zip(bins, counts)},
        "at_least": {f"{t:.2f}": int((scores >= t).sum()) for t in THRESHOLDS},
    }


def merge(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"count": 0, "sum": 0.0, "sumsq": 0.0, "min": None, "max": None, "bins": {},
                              "at_least": {f"{t:.2f}": 0 for t in THRESHOLDS}}
    for part in parts:
        merged["count"] += part["count"]
        merged["sum"] += part["sum"]
        merged["sumsq"] += part["sumsq"]
        for bound, pick in (("min", min), ("max", max)):
            if part[bound] is not None:
                merged[bound] = part[bound] if merged[bound] is None else pick(merged[bound], part[bound])
        for b, c in part["bins"].items():
            merged["bins"][b] = merged["bins"].get(b, 0) + c
        for t, c in part["at_least"].items():
            merged["at_least"][t] += c
    return merged


def subtract(merged: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``merged`` without ``part`` (a histogram merged into it before). min and max cannot be taken back:
    they come back None, for the caller to set from what it knows of the remaining parts."""
    out = {"count": merged["count"] - part["count"], "sum": merged["sum"] - part["sum"],
           "sumsq": merged["sumsq"] - part["sumsq"], "min": None, "max": None,
           "bins": dict(merged["bins"]), "at_least": dict(merged["at_least"])}
    for b, c in part["bins"].items():
        left = out["bins"].get(b, 0) - c
        if left:
            out["bins"][b] = left
        else:
            out["bins"].pop(b, None)
    for t, c in part["at_least"].items():
        out["at_least"][t] = out["at_least"].get(t, 0) - c
    return out


def consistent(merged: dict[str, Any]) -> bool:
    """No negative counts, and the bins add up to the count (what a subtraction must leave)."""
    counts = [*merged["bins"].values(), *merged["at_least"].values()]
    return merged["count"] >= 0 and min(counts, default=0) >= 0 and sum(merged["bins"].values()) == merged["count"]


def _dense(merged: dict[str, Any]) -> np.ndarray:
    dense = np.zeros(BINS, dtype=np.int64)
    for b, c in merged["bins"].items():
        dense[int(b)] = c
    return dense


def _order_statistic(cumulative: np.ndarray, k: int, lo: float, hi: float) -> float:
    """The k-th smallest score (0-based), read as the middle of its bin, kept within [min, max]."""
    b = int(np.searchsorted(cumulative, k, side="right"))
    return float(min(max(LOW + (b + 0.5) * WIDTH, lo), hi))


def quantile(merged: dict[str, Any], q: float) -> float:
    """numpy's default (linear) quantile, from the histogram."""
    n = merged["count"]
    cumulative = np.cumsum(_dense(merged))
    rank = q * (n - 1)
    below, above = math.floor(rank), math.ceil(rank)
    a = _order_statistic(cumulative, below, merged["min"], merged["max"])
    b = _order_statistic(cumulative, above, merged["min"], merged["max"])
    return a + (rank - below) * (b - a)


def summarize(merged: dict[str, Any]) -> dict[str, Any]:
    """The job-level report: count, mean, std, quantiles, a display histogram, fractions kept."""
    n = merged["count"]
    if n == 0:
        return {"count": 0}
    mean = merged["sum"] / n
    std = math.sqrt(max(merged["sumsq"] / n - mean * mean, 0.0))
    dense = _dense(merged)
    per_display = int(round(DISPLAY_WIDTH / WIDTH))
    coarse = dense.reshape(-1, per_display).sum(axis=1)
    nonzero = np.nonzero(coarse)[0]
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    return {
        "count": n,
        "mean": mean,
        "std": std,
        "min": merged["min"],
        "max": merged["max"],
        "quantiles": {f"p{p}": quantile(merged, p / 100) for p in QUANTILES},
        "histogram": {
            "edges": [round(LOW + i * DISPLAY_WIDTH, 4) for i in range(first, last + 1)],
            "counts": [int(c) for c in coarse[first:last]],
        },
        "fraction_kept": {t: c / n for t, c in merged["at_least"].items()},
    }
