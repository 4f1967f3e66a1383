"""The scale bench's report: the costs it curves, their log-log slopes, the table, the ratios to a
baseline run and the plot (bench/scale.py measures; this reads its results)."""
from __future__ import annotations

from typing import Any, Callable

# (name, how to read it from one size's result): the costs whose curves the bench reports
METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "nightly_requests": lambda r: r["nightly"][0]["requests"]["total"],
    "nightly_s": lambda r: r["nightly"][0]["seconds"],
    "nightly_rss_mb": lambda r: r["nightly"][0]["peak_rss_mb"],
    "topup_requests": lambda r: r["topup"]["requests"]["total"],
    "fresh_submit_s": lambda r: r["fresh"]["seconds"],
    "fresh_rss_mb": lambda r: r["fresh"]["peak_rss_mb"],
    "redis_bytes_per_planned": lambda r: r["fresh"]["redis_bytes_per_planned"],
    "redis_bytes_per_queued": lambda r: r["fresh"]["redis_bytes_per_queued"],
    "settle_requests": lambda r: r["settle"]["requests"]["total"],
    "settle_end_requests": lambda r: r["settle_run"]["finalize_requests"].get("total"),
    "finalize_s": lambda r: r["topup_run"]["finalize_s"],
    "finalize_requests": lambda r: r["topup_run"]["finalize_requests"].get("total"),
    "commit_s": lambda r: r["commit"]["commit_s"],
    "commit_writes_per_shard": lambda r: r["commit"]["writes_per_shard"],
}


def slope(xs: list[float], ys: list[float | None]) -> float | None:
    """The log-log slope (numpy polyfit, degree 1) over the points with a positive value."""
    import numpy as np

    points = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0 and x > 0]
    if len({p[0] for p in points}) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0])


def curves(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backend: each metric's slope against shard count, and the nightly costs' slopes against
    new shards at the largest size (the top-up's 1 new shard, then each --fractions point)."""
    out: dict[str, Any] = {}
    for backend in sorted({r["backend"] for r in results}):
        rows = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["shards"])
        sizes = [r["shards"] for r in rows]
        by_size = {name: slope(sizes, [read(r) for r in rows]) for name, read in METRICS.items()}
        last = rows[-1]
        points = [(1, last["topup"])] + [(n["new"], n) for n in last["nightly"]]
        news = [p[0] for p in points]
        by_new = {"at_shards": last["shards"], "new": news,
                  "requests": slope(news, [p[1]["requests"]["total"] for p in points]),
                  "seconds": slope(news, [p[1]["seconds"] for p in points])}
        out[backend] = {"against_shards": by_size, "against_new_shards": by_new}
    return out


COLUMNS = (("backend", "{backend}"), ("shards", "{shards}"), ("new", "{new}"), ("nightly req", "{nightly_requests}"),
           ("nightly s", "{nightly_s:.2f}"), ("+1 req", "{topup_requests}"), ("fresh s", "{fresh_submit_s:.1f}"),
           ("B/shard", "{redis_bytes_per_planned:.0f}"), ("end s", "{finalize_s:.2f}"),
           ("end req", "{finalize_requests}"), ("1st end req", "{settle_end_requests}"), ("commit s", "{commit_s:.3f}"),
           ("writes", "{commit_writes_per_shard:.0f}"), ("RSS MB", "{rss:.0f}"))


def table(results: list[dict[str, Any]]) -> str:
    """One row per backend and size, in markdown (docs/scaling.md takes it as it is)."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        values = {name: read(r) for name, read in METRICS.items()}
        values.update(backend=r["backend"], shards=f"{r['shards']:,}", new=r["nightly"][0]["new"],
                      rss=max(r["fresh"]["peak_rss_mb"], r["nightly"][0]["peak_rss_mb"]))
        cells = []
        for _, fmt in COLUMNS:
            try:
                cells.append(fmt.format(**values))
            except (TypeError, ValueError):  # a figure the run did not produce
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against(results: list[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, Any]:
    """Each metric as a fraction of the baseline run's at the same backend and size (1.0: unchanged)."""
    theirs = {(r["backend"], r["shards"]): r for r in baseline["results"]}
    out: dict[str, Any] = {}
    for r in results:
        old = theirs.get((r["backend"], r["shards"]))
        if old is None:
            continue
        ratios = {}
        for name, read in METRICS.items():
            try:
                ratios[name] = read(r) / read(old)
            except (TypeError, ZeroDivisionError, KeyError, IndexError):
                ratios[name] = None
        out[f"{r['backend']} {r['shards']}"] = ratios
    return out


COLORS = {"local": "tab:blue", "s3": "tab:orange"}
PLOTTED = ("nightly_requests", "nightly_s", "finalize_requests", "fresh_submit_s", "redis_bytes_per_planned",
           "fresh_rss_mb")


def plot(report: dict[str, Any], baseline: dict[str, Any] | None, path: str) -> None:
    """Log-log curves of the main costs against shard count, per backend; the baseline's dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7), dpi=90)
    runs = [(report, "-", "")] + ([(baseline, "--", " (baseline)")] if baseline else [])
    for k, name in enumerate(PLOTTED):
        ax = fig.add_subplot(2, 3, k + 1)
        for run_, style, note in runs:
            for backend in sorted({r["backend"] for r in run_["results"]}):
                rows = sorted((r for r in run_["results"] if r["backend"] == backend), key=lambda r: r["shards"])
                points = [(r["shards"], METRICS[name](r)) for r in rows]
                points = [(x, y) for x, y in points if y]
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=backend + note,
                        color=COLORS.get(backend))
        ax.set(xscale="log", yscale="log", title=name, xlabel="committed shards")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
