"""The job report: merged score histograms -> report/summary.json, scores.png and index.html.

The job's end merges incrementally (core/merged.py); ``full_totals`` reads every shard's stats,
for when the saved totals cannot be trusted.

Every embed/score report also says what was embedded (pairs, images or captions, and how many)
and the error reasons over the whole output; an image- or text-only output has no scores.
"""
from __future__ import annotations

import html
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from clipbatch.core import commit, layout
from clipbatch.core.merged import Totals, from_stats, with_bounds
from clipbatch.core.scores import THRESHOLDS, summarize
from clipbatch.core.storage import Storage

SUMMARY = layout.SUMMARY
_IO_THREADS = 16
_TOP_REASONS = 3
EMBEDDED = {"pairs": "pairs", "image": "images", "text": "captions"}
# When nothing was embedded: the hint for the commonest reason that another modality avoids.
_HINTS = (("no caption", "pairs", "for images without captions use --modality image"),
          ("no image", "pairs", "for captions without images use --modality text"))


def _stats(storage: Storage, index: int) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read(layout.stats(index)))
    except FileNotFoundError:
        return None


def read_stats(storage: Storage, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The stats files of these shards, those that exist (parallel GETs)."""
    indices = list(indices)
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        found = list(pool.map(lambda i: _stats(storage, i), indices))
    return {i: s for i, s in zip(indices, found) if s is not None}


def full_totals(storage: Storage) -> tuple[dict[int, dict[str, Any]], Totals]:
    """Every marker of the output, and the totals over every committed shard's stats (reads them all)."""
    markers = commit.list_markers(storage)
    return markers, from_stats(markers, read_stats(storage, markers))


def keep_replaced_stats(storage: Storage, index: int) -> None:
    """Before a plan drops shard ``index``'s commit to rescore it: keep its stats for the job's end
    to take out of the saved totals (core/merged.py). A shard without stats keeps nothing."""
    try:
        storage.copy(layout.stats(index), layout.replaced_stats(index))
    except FileNotFoundError:
        pass


def build_report(storage: Storage, job: dict[str, Any], totals: Totals) -> dict[str, Any]:
    """Write the report of the whole output from its merged shard stats."""
    spec = job.get("spec") or {}
    modality = spec.get("modality", "pairs")
    summary = summarize(with_bounds(totals))
    reasons = totals.reasons
    summary.update(job_id=job.get("job_id"), output=storage.uri, shards=len(totals.covers),
                   model=spec.get("model", {}).get("name"), modality=modality,
                   embedded={EMBEDDED[modality]: totals.samples()[0]},
                   errors=sum(reasons.values()), error_reasons=dict(reasons.most_common()))
    storage.write(SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
    if summary["count"]:
        storage.write(layout.SCORES_PNG, _plot(summary))
        storage.write(layout.REPORT_PAGE, _page(summary).encode())
    return summary


def _axes():
    """A matplotlib figure and axes with no GUI backend (workers and producers are headless)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _plot(summary: dict[str, Any]) -> bytes:
    return _png(_score_figure(summary)[0])


def _score_figure(summary: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The clip_score histogram with a dashed line and a label per threshold: (figure, the labels)."""
    edges, counts = summary["histogram"]["edges"], summary["histogram"]["counts"]
    fig, ax = _axes()
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    for t in THRESHOLDS:
        ax.axvline(t, color="crimson", linestyle="--", linewidth=1)
    ax.set_xlabel("clip_score (cosine of image and caption embeddings)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{summary['count']} pairs, {summary['model']}")
    labels = _threshold_labels(ax, summary["fraction_kept"])
    lowest = min(ax.transAxes.inverted().transform(label.get_window_extent())[0][1] for label in labels)
    ax.set_ylim(0, max(max(counts, default=1), 1) / max(lowest - 0.03, 0.3))  # the bars stay under the labels
    return fig, labels


_LABEL_TOP = 0.97  # a threshold's label hangs from this height (axes fraction) when it has room there
_LABEL_GAP_PX = 3


def _threshold_labels(ax: Any, fraction_kept: dict[str, float]) -> list[Any]:
    """Label each threshold's line at the top; a label that would overlap one placed before hangs just
    below it instead (thresholds as close as 0.28 and 0.30 stay readable at any x range)."""
    placed: list[Any] = []  # the window extents of the labels placed so far
    labels = []
    for t in THRESHOLDS:
        label = ax.text(t, _LABEL_TOP, f" {t:.2f}\n {fraction_kept[f'{t:.2f}']:.1%} kept", color="crimson",
                        fontsize=7, va="top", transform=ax.get_xaxis_transform(),
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
        while True:
            box = label.get_window_extent().padded(_LABEL_GAP_PX)
            hit = [p for p in placed if box.overlaps(p)]
            if not hit:
                break
            top_px = min(p.y0 for p in hit) - _LABEL_GAP_PX - 1
            below = ax.transAxes.inverted().transform((0, top_px))[1]
            label.set_y(min(below, label.get_position()[1] - 0.005))  # always lower: the loop ends
        placed.append(box)
        labels.append(label)
    return labels


def _page(summary: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{k}</td><td>{v:.4f}</td></tr>" for k, v in summary["quantiles"].items())
    kept = "".join(f"<tr><td>&ge; {t}</td><td>{f:.2%}</td></tr>" for t, f in summary["fraction_kept"].items())
    title = html.escape(f"clip_score report: {summary['output']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>
<p>{summary['count']} pairs in {summary['shards']} shards; model {html.escape(str(summary['model']))};
mean {summary['mean']:.4f}, std {summary['std']:.4f}.</p>
<img src="scores.png" alt="histogram of clip_score with thresholds">
<h2>Quantiles</h2><table>{rows}</table>
<h2>Fraction kept at a threshold</h2><table>{kept}</table>
</body></html>
"""


def nothing_embedded(samples_done: int, samples_failed: int, summary: dict[str, Any]) -> str | None:
    """Why a job that embedded nothing is not a success (None when it embedded something, or had no input):
    ``0 of 4 embedded: no caption member (.txt) x4; for images without captions use --modality image``."""
    if samples_done or not samples_failed:
        return None
    top = Counter(summary.get("error_reasons", {})).most_common(_TOP_REASONS)
    text = f"0 of {samples_failed} embedded: " + ", ".join(f"{reason} x{n}" for reason, n in top)
    modality = summary.get("modality", "pairs")
    hint = next((h for start, mode, h in _HINTS if top and top[0][0].startswith(start) and modality == mode), None)
    return f"{text}; {hint}" if hint else text


def format_summary(summary: dict[str, Any]) -> str:
    """The report as terminal text."""
    if summary.get("modality", "pairs") != "pairs":
        ((what, n),) = summary["embedded"].items()
        return (f"{n} {what} embedded in {summary['shards']} shards ({summary['model']}, {summary['modality']}-only: "
                f"no clip_score), {summary['errors']} errors")
    if not summary.get("count"):
        return "no scores yet"
    lines = [f"{summary['count']} pairs in {summary['shards']} shards ({summary['model']}): "
             f"mean {summary['mean']:.4f}, std {summary['std']:.4f}"]
    lines.append("quantiles: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["quantiles"].items()))
    lines.append("kept at:   " + "  ".join(f">={t} {f:.1%}" for t, f in summary["fraction_kept"].items()))
    return "\n".join(lines)


def finish_finetune(storage: Storage, job: dict[str, Any]) -> dict[str, Any]:
    """At the end of a fine-tune: ``checkpoints/final.pt`` and the loss curve in ``report/``."""
    steps = job["shards_total"]
    metrics = [json.loads(storage.read(layout.step_metrics(k))) for k in range(steps)]
    storage.copy(layout.checkpoint(steps - 1), layout.FINAL_CHECKPOINT)
    summary = {"steps": steps, "final_checkpoint": f"{storage.uri}/{layout.FINAL_CHECKPOINT}",
               "loss": [m["loss"] for m in metrics], "logit_scale": [m["logit_scale"] for m in metrics],
               "samples": sum(m["samples"] for m in metrics)}
    storage.write(SUMMARY, json.dumps(summary, indent=2).encode())
    storage.write(layout.LOSS_PNG, _loss_plot(metrics))
    return summary


def _loss_plot(metrics: list[dict[str, Any]]) -> bytes:
    fig, ax = _axes()
    losses = [loss for m in metrics for loss in m["losses"]]
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("batch")
    ax.set_ylabel("contrastive loss (symmetric InfoNCE)")
    ax.set_title(f"{len(metrics)} steps, final 1/tau = {metrics[-1]['logit_scale']:.1f}")
    return _png(fig)
