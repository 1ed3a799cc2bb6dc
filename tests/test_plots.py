"""The plots a person reads in MLflow: what is drawn (titles, labelled axes, the chance line, confidence
intervals, a legend clear of the data), checked on the figures' artists, not only that a PNG exists."""

from __future__ import annotations

import math

import pytest
from matplotlib.container import ErrorbarContainer

from dmoerm.tracking import CHANCE, plot_accuracy, plot_confusion, plot_history, wilson_interval

DMOERM = {"helpful": {"accuracy": 0.62, "pairs": 118}, "red_team": {"accuracy": 0.9, "pairs": 20},
          "overall": {"accuracy": 0.668, "pairs": 138}}
BASELINE = {"helpful": {"accuracy": 0.58, "pairs": 118}, "red_team": {"accuracy": 0.55, "pairs": 20},
            "overall": {"accuracy": 0.576, "pairs": 138}}
HISTORY = [{"step": s, "train_loss": 0.7 - 0.001 * s, "val_loss": 0.69 - 0.0008 * s, "val_accuracy": 0.5 + 0.001 * s}
           for s in range(0, 300, 25)]


def _chance_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if set(ln.get_ydata()) == {CHANCE} and ln.get_linestyle() != "-"]


def _overlaps_data(fig, ax) -> bool:
    """Whether the figure's legend box intersects the axes' plotting area (where bars and curves are)."""
    fig.canvas.draw()
    legend = (fig.legends or [ax.get_legend()])[0]
    box, area = legend.get_window_extent(), ax.get_window_extent()
    return box.overlaps(area)


def test_wilson_interval():
    lo, hi = wilson_interval(0.9, 20)
    assert (round(lo, 3), round(hi, 3)) == (0.699, 0.972)  # the textbook value for 18/20
    assert lo < 0.9 < hi
    assert wilson_interval(1.0, 5)[1] == 1.0 and wilson_interval(0.0, 5)[0] == 0.0
    assert all(math.isnan(x) for x in wilson_interval(0.5, 0))
    narrow, wide = wilson_interval(0.6, 1000), wilson_interval(0.6, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_accuracy_plot_has_title_chance_line_intervals_and_a_clear_legend():
    fig = plot_accuracy(DMOERM, BASELINE)
    ax = fig.axes[0]
    assert "accuracy" in ax.get_title()
    assert ax.get_ylabel() == "pairwise accuracy" and ax.get_xlabel()
    assert len(_chance_lines(ax)) == 1
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one set of intervals per model
    # The DMoERM interval of red_team (18/20 pairs) is the Wilson interval, drawn around its bar.
    segments = bars[0].lines[2][0].get_segments()
    (_, lo), (_, hi) = segments[1]
    assert (lo, hi) == pytest.approx(wilson_interval(0.9, 20))
    assert [t.get_text() for t in ax.get_xticklabels()][1] == "red_team\n(20 pairs)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["DMoERM", "single RM", "chance (0.5)"]
    assert not _overlaps_data(fig, ax)


def test_accuracy_plot_without_a_baseline_leaves_missing_categories_undrawn():
    fig = plot_accuracy(DMOERM, {"helpful": {"accuracy": 0.5, "pairs": 118}})
    heights = [b.get_height() for b in fig.axes[0].containers[2]]  # the single RM's bars
    assert heights[0] == 0.5 and math.isnan(heights[1])  # no bar at 0 for a category it was not tested on
    assert len(plot_accuracy(DMOERM, None).legends[0].get_texts()) == 2


def test_training_curve_has_labelled_twin_axes_and_a_legend_off_the_curves():
    fig = plot_history(HISTORY, "experts/helpful/helpfulness")
    loss_ax, acc_ax = fig.axes
    assert "experts/helpful/helpfulness" in loss_ax.get_title()
    assert loss_ax.get_xlabel() == "optimiser step"
    assert loss_ax.get_ylabel().startswith("loss")
    assert acc_ax.get_ylabel() == "pairwise accuracy"
    assert acc_ax.get_ylim() == (0, 1)
    assert len(_chance_lines(acc_ax)) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["train loss (last batch)", "validation loss", "validation pairwise accuracy", "chance (0.5)"]
    assert not _overlaps_data(fig, loss_ax)


def test_confusion_plot_names_its_axes():
    fig = plot_confusion([[110, 8], [5, 117]], ["helpful", "red_team"])
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("routed category", "true category")
    assert ax.get_title() and fig.axes[1].get_ylabel() == "samples"  # the colour bar says what it counts
    assert sorted(t.get_text() for t in ax.texts) == ["110", "117", "5", "8"]


def test_perfect_and_zero_accuracies_plot_without_negative_error_bars():
    """A category every pair of which is right (or wrong): the Wilson bound equals the accuracy only up to
    float rounding, which must not become a negative error bar (matplotlib refuses those)."""
    import matplotlib.pyplot as plt

    for n in range(1, 200):
        plt.close(plot_accuracy({"a": {"accuracy": 1.0, "pairs": n}, "overall": {"accuracy": 0.0, "pairs": n}}, None))
