"""What every study reports: a table (printed and logged), plots (PNG), the raw numbers (CSV and JSON), all
logged to one MLflow run; and a cache of finished trials keyed by their inputs, so a re-run reuses them.

Ray-free. MLflow and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

logger = logging.getLogger(__name__)


def bootstrap_mean(values: Sequence[float], num_bootstrap: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its two-sided percentile-bootstrap interval
    (``num_bootstrap`` resamples of the values with replacement, seeded)."""
    import torch

    if not values:
        raise ValueError("bootstrap_mean: no values")
    x = torch.tensor(list(values), dtype=torch.float64)  # (P,)
    gen = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, num_bootstrap, 256):  # bounds memory to 256 x P indices
        idx = torch.randint(x.numel(), (min(256, num_bootstrap - start), x.numel()), generator=gen)  # (B, P)
        means.append(x[idx].mean(dim=1))
    alpha = 1.0 - confidence
    low, high = torch.quantile(torch.cat(means), torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return float(x.mean()), float(low), float(high)


@dataclass
class Table:
    """A study's table: a title, column names, and rows of values (numbers are printed with ``digits``)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    digits: int = 3
    notes: list[str] = field(default_factory=list)

    def _cell(self, v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{self.digits}f}"
        return str(v)

    def format(self) -> str:
        cells = [self.columns] + [[self._cell(v) for v in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in cells[1:]]
        return "\n".join(lines + self.notes)


def to_csv(records: Sequence[Any]) -> str:
    """Dataclass instances (or dicts) -> CSV text with a header row."""
    dicts = [asdict(r) if is_dataclass(r) else dict(r) for r in records]
    buf = io.StringIO()
    if dicts:
        writer = csv.DictWriter(buf, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)
    return buf.getvalue()


def to_json(records: Sequence[Any], **extra: Any) -> str:
    dicts = [asdict(r) if is_dataclass(r) else dict(r) for r in records]
    return json.dumps({**extra, "rows": dicts}, indent=1, default=str, allow_nan=True)


def plot_reward_vs_kl(points: Sequence[Any], title: str, gold_label: str, proxy_label: str,
                      chance: float | None = None, chance_label: str = "random candidate (N=1)",
                      confidence: float = 0.95):
    """Best-of-N curves: gold (left panel) and proxy (right panel) reward against the analytic KL, one
    colour per reward model, the bands its ``confidence`` interval over prompts, the N of each point on a
    top axis. ``points`` have ``model, n, kl, gold, gold_low, gold_high, proxy, proxy_low, proxy_high``;
    a model whose proxy is NaN (the gold oracle) is drawn in the gold panel only."""
    from dmoerm.tracking import _legend_below, _plt

    plt = _plt()
    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained", sharex=True)
    models = list(dict.fromkeys(p.model for p in points))
    colours = plt.get_cmap("tab10")
    handles = []
    for m, model in enumerate(models):
        mine = sorted((p for p in points if p.model == model), key=lambda p: p.n)
        xs = [p.kl for p in mine]
        style = {"color": "black" if model == "gold oracle" else colours(m), "marker": "o",
                 "linestyle": ":" if model == "gold oracle" else "-"}
        handles += gold_ax.plot(xs, [p.gold for p in mine], label=model, **style)
        gold_ax.fill_between(xs, [p.gold_low for p in mine], [p.gold_high for p in mine], color=style["color"],
                             alpha=0.15, linewidth=0)
        if not all(math.isnan(p.proxy) for p in mine):
            proxy_ax.plot(xs, [p.proxy for p in mine], **style)
            proxy_ax.fill_between(xs, [p.proxy_low for p in mine], [p.proxy_high for p in mine],
                                  color=style["color"], alpha=0.15, linewidth=0)
    if chance is not None:
        handles.append(gold_ax.axhline(chance, color="red", linestyle="--", linewidth=1, label=chance_label))
    ns = sorted({(p.n, p.kl) for p in points})
    for ax, label, name in ((gold_ax, gold_label, "gold"), (proxy_ax, proxy_label, "proxy")):
        ax.set_xlabel("KL(best-of-N || policy) = log N - (N-1)/N  (nats)")
        ax.set_ylabel(label)
        ax.set_title(f"{name} reward of the picked response")
        top = ax.secondary_xaxis("top")
        top.set_xticks([kl for _, kl in ns], [str(n) for n, _ in ns])
        top.set_xlabel("N (candidates per prompt)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (bands: {confidence:.0%} bootstrap interval over prompts)")
    _legend_below(fig, handles, ncol=min(len(handles), 5))
    return fig


def log_study(tracking_uri: str, experiment: str, run_name: str, *, params: Any, table: Table,
              figures: dict[str, Any], raw: dict[str, str], metrics: dict[str, float] | None = None,
              artifact_location: str | None = None) -> str:
    """One MLflow run for a study: its config as params, ``metrics``, the table (``table.txt``), every
    figure under ``plots/`` (PNG) and every raw file (name -> text: CSV, JSON) under ``results/``.
    Returns the run id."""
    from dmoerm.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment, artifact_location, run_name=run_name)
    tracker.log_params(tracker.run_id, params)
    tracker.log_metrics(tracker.run_id, metrics or {})
    tracker.client.log_text(tracker.run_id, table.format(), "table.txt")
    for name, fig in figures.items():
        tracker.log_figure(tracker.run_id, fig, name)
    for name, text in raw.items():
        tracker.client.log_text(tracker.run_id, text, f"results/{name}")
    tracker.finish(tracker.run_id)
    return tracker.run_id


def study_tracking(tracking_uri: str | None, storage_uri: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): the given URI or ``MLFLOW_TRACKING_URI``,
    else the embedded default (a SQLite file beside the storage, artifacts in ``mlartifacts/`` beside it)."""
    import os
    from pathlib import Path

    from dmoerm.tracking import default_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage_uri)
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return uri, artifacts


class TrialCache:
    """Finished trials of a study under ``<storage>/stages/<study>/<key>/result.json`` (a ``StageStore``
    stage; ``DONE.json`` last): ``key`` is a hash of everything the trial reads."""

    def __init__(self, storage_uri: str, study: str) -> None:
        from dmoerm.stages.store import StageStore

        self.store, self.stage = StageStore(storage_uri), study

    def key(self, **inputs: Any) -> str:
        return self.store.key(**inputs)

    def get(self, key: str) -> Any | None:
        if self.store.done(self.stage, key) is None:
            return None
        return self.store.get_json(self.stage, key, "result.json")

    def put(self, key: str, result: Any, info: dict | None = None) -> None:
        self.store.put_json(self.stage, key, "result.json", result)
        self.store.mark_done(self.stage, key, info)

    def get_or_run(self, key: str, run: Callable[[], Any]) -> tuple[Any, bool]:
        """(result, ran): the cached result, or ``run()``'s, stored."""
        cached = self.get(key)
        if cached is not None:
            return cached, False
        result = run()
        self.put(key, result)
        return result, True
