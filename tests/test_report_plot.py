"""The score plot's threshold labels stay readable: no two overlap, however close the thresholds sit
on the x axis, and the bars stay under them (boxes measured by matplotlib's own renderer)."""
from __future__ import annotations

import io
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from clipbatch.core.report import _plot, _score_figure
from clipbatch.core.scores import THRESHOLDS, histogram, merge, summarize


def summary_of(scores: np.ndarray) -> dict:
    return {**summarize(merge([histogram(scores)])), "model": "ViT-B-32"}


# A narrow spread puts 0.25/0.28/0.30 far apart on screen; a wide one (or one far from the
# thresholds) squeezes all four into a few pixels.
SPREADS = {"narrow": (0.26, 0.03), "wide": (0.1, 0.3), "far_below": (-0.6, 0.05), "one_value": (0.27, 0.0)}


@pytest.mark.parametrize("spread", SPREADS)
def test_threshold_labels_do_not_overlap(spread):
    # given
    mean, std = SPREADS[spread]
    scores = np.clip(np.random.default_rng(0).normal(mean, std, 3000), -1, 0.999)

    # when
    fig, labels = _score_figure(summary_of(scores))

    # then: one label per threshold, and no two boxes share a pixel
    boxes = [label.get_window_extent() for label in labels]
    assert [label.get_text().split()[0] for label in labels] == [f"{t:.2f}" for t in THRESHOLDS]
    for (i, a), (j, b) in combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"labels {THRESHOLDS[i]} and {THRESHOLDS[j]} overlap: {a} {b}"
    # and the tallest bar ends below the lowest label
    ax = fig.axes[0]
    tallest = ax.transData.transform((0, max(summary_of(scores)["histogram"]["counts"])))[1]
    assert tallest < min(b.y0 for b in boxes)


def test_close_thresholds_would_collide_at_one_height():
    # given: a wide x range, where the labels of 0.28 and 0.30 share x pixels
    scores = np.random.default_rng(1).normal(0.1, 0.3, 3000).clip(-1, 0.999)
    fig, labels = _score_figure(summary_of(scores))
    a, b = (labels[THRESHOLDS.index(t)].get_window_extent() for t in (0.28, 0.30))

    # then: side by side they would overlap, so the placement is what keeps them apart
    assert a.x1 > b.x0
    assert b.y1 <= a.y0 or a.y1 <= b.y0


def test_the_plot_is_a_png():
    png = _plot(summary_of(np.random.default_rng(2).normal(0.25, 0.05, 500)))
    assert Image.open(io.BytesIO(png)).format == "PNG"
