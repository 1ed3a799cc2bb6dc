"""MLflow tracking for pipeline runs: one parent run, child runs per stage and per expert, metrics,
plots as artifacts, and the embedded defaults (a SQLite store beside local storage, artifacts beside it).
MLflow is imported inside the functions; secrets never reach it (the config holds only the NAMES of
environment variables)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmoerm.configtools import to_dict
from dmoerm.names import metric_name
from dmoerm.redact import redact_credentials

if TYPE_CHECKING:
    from dmoerm.config import PlatformConfig

logger = logging.getLogger(__name__)
SECRET_WORDS = ("key", "apikey", "token", "secret", "password", "passwd", "credentials")
"""A config key whose words (split at ``_``, ``-``, ``.`` and case changes) include one of these holds a
secret: its value never reaches MLflow (``api_key``, ``auth_token``; not ``max_tokens`` or ``tokenizer``).
Keys ending in ``_env`` hold the NAME of a variable and are kept."""


def _is_secret_key(name: str) -> bool:
    if name.endswith("_env"):
        return False
    words = re.split(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])", name)
    return any(w.lower() in SECRET_WORDS for w in words if w)


def default_tracking_uri(storage_uri: str) -> str:
    """The embedded default: a SQLite file beside local storage (remote storage: ./.scratch)."""
    from dmoerm import storage

    base = Path(".scratch") if storage.is_s3(storage_uri) else Path(storage_uri)
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def tracking_uri_of(platform: PlatformConfig) -> str:
    """``platform.mlflow_tracking_uri``, or the embedded default beside the storage."""
    return platform.mlflow_tracking_uri or default_tracking_uri(platform.storage_uri)


def open_tracker(platform: PlatformConfig, run_name: str) -> Tracker:
    """A new parent run at ``platform.mlflow_tracking_uri``, or at the embedded default
    (``default_tracking_uri``) with its artifacts in ``mlartifacts/`` beside the SQLite file."""
    uri = tracking_uri_of(platform)
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return Tracker(uri, platform.experiment, artifacts, run_name=run_name)


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Config -> ``{"phase1.lr": "0.0001", ...}``; values under secret keys (:data:`SECRET_WORDS`) are
    dropped (and logged by name), credentials inside URL values are masked (:func:`redact_credentials`)."""
    out: dict[str, str] = {}
    data = to_dict(obj)
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{metric_name(str(k))}" if prefix else str(k)  # a capability: MLflow-safe
            if _is_secret_key(str(k)):
                logger.debug("not logging parameter %s: its name says it holds a secret", key)
                continue
            out.update(flatten_params(v, key))
    else:
        out[prefix] = redact_credentials(str(data))[:500]
    return out


class Tracker:
    """A parent run and its children, through ``MlflowClient`` (thread-safe, works from any process)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None,
                 run_name: str = "pipeline", parent_run_id: str | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_location)
        if parent_run_id is None:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        else:
            self.run_id = parent_run_id

    def child(self, name: str, params: dict | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id})
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Any) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k[:250], v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i: i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not math.isnan(float(v))]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_figure(self, run_id: str, fig, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            fig.savefig(path, dpi=110, bbox_inches="tight")
            self.client.log_artifact(run_id, path, artifact_path="plots")
        _plt().close(fig)  # pyplot keeps every open figure (and warns past 20)

    # ---- a pipeline's child runs ------------------------------------------------------------------
    def log_stage(self, name: str, key: str, info: dict, ran: bool, run_id: str | None = None) -> None:
        """A finished child run for one stage (``run_id``, or a new one called ``name``): its key, whether
        this run did it or skipped it, its numeric figures."""
        child = run_id or self.child(name)
        self.log_params(child, {"stage": name.split("/")[0], "key": key, "skipped": str(not ran)})
        self.log_metrics(child, {k: v for k, v in info.items() if isinstance(v, (int, float))})
        self.finish(child)

    def log_expert(self, name: str, key: str, info: dict, ran: bool) -> None:
        """An expert's child run: its training curves step by step, its figures and a training-curve plot."""
        child = self.child(name, {"stage": "experts", "key": key, "skipped": str(not ran),
                                  "workers": str(info.get("workers"))})
        curves = info.get("metrics") or {}
        for metric in ("train_loss", "val_accuracy"):
            for step, value in curves.get(metric, []):
                self.log_metrics(child, {metric: value}, int(step))
        self.log_metrics(child, {k: info[k] for k in ("val_accuracy", "resumed_from_step", "seconds")
                                 if isinstance(info.get(k), (int, float))})
        if curves.get("history"):
            self.log_figure(child, plot_history(curves["history"], name), "training_curve.png")
        self.finish(child)

    def log_evaluation(self, report: dict) -> None:
        """An ``evaluate`` stage's report on the parent run: metrics, router confusion and per-category
        accuracy plots, the table."""
        self.log_metrics(self.run_id, {k.replace("/", "."): v for k, v in report["metrics"].items()})
        if report.get("confusion"):  # None: the test samples' categories are not router classes
            self.log_figure(self.run_id, plot_confusion(report["confusion"], report["categories"]),
                            "router_confusion.png")
        self.log_figure(self.run_id, plot_accuracy(report["dmoerm"], report["baseline"]), "accuracy_by_category.png")
        self.client.log_text(self.run_id, report["table"], "evaluation/table.txt")


# ---- plots --------------------------------------------------------------------------------------
CHANCE = 0.5
"""Pairwise accuracy of a random scorer: the reference line on every accuracy plot."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at ``z=1.96``) of an accuracy measured on ``n`` pairs; (nan, nan)
    without pairs. It treats pairs as independent; the pairs of one multi-response sample are not, so there
    it is somewhat too narrow (the promotion's paired bootstrap, which resamples samples, is the decision)."""
    import math

    if not n or math.isnan(accuracy):
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _legend_below(fig, handles: list, ncol: int) -> None:
    """A legend in its own space under the axes (constrained layout), where it cannot cover the data."""
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, fontsize="small")


def plot_history(history: list[dict], title: str):
    """Training curve: the training batch loss and validation loss (left axis) and the validation pairwise
    accuracy with the chance line (right axis) at every evaluation, against optimiser steps."""
    plt = _plt()
    fig, loss_ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    steps = [h["step"] for h in history]
    handles = loss_ax.plot(steps, [h["train_loss"] for h in history], color="tab:blue", marker=".",
                           label="train loss (last batch)")
    if any("val_loss" in h for h in history):
        handles += loss_ax.plot(steps, [h.get("val_loss", float("nan")) for h in history], color="tab:blue",
                                linestyle="--", marker=".", label="validation loss")
    loss_ax.set_xlabel("optimiser step")
    loss_ax.set_ylabel("loss (pairwise -log sigmoid)", color="tab:blue")
    acc_ax = loss_ax.twinx()
    handles += acc_ax.plot(steps, [h["val_accuracy"] for h in history], color="tab:orange", marker="o",
                           label="validation pairwise accuracy")
    handles.append(acc_ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1, label="chance (0.5)"))
    acc_ax.set_ylim(0, 1)
    acc_ax.set_ylabel("pairwise accuracy", color="tab:orange")
    loss_ax.set_title(f"training curve: {title}")
    _legend_below(fig, handles, ncol=2)
    return fig


def plot_confusion(matrix: list[list[int]], categories: list[str]):
    """Router confusion on the test samples: true category (rows) against routed category (columns)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(categories), 1.6 + 0.8 * len(categories)), layout="constrained")
    image = ax.imshow(matrix, cmap="Blues")
    peak = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    ax.set_yticks(range(len(categories)), categories)
    ax.set_xlabel("routed category")
    ax.set_ylabel("true category")
    ax.set_title("router confusion (test samples)")
    fig.colorbar(image, ax=ax, label="samples")
    return fig


def plot_accuracy(dmoerm: dict, baseline: dict | None):
    """Pairwise accuracy on the held-out test pairs per category (and overall), DMoERM beside the single-RM
    baseline, each bar with its 95% Wilson interval over the category's pairs, and the chance line."""
    plt = _plt()
    cats = list(dmoerm)
    models = [("DMoERM", dmoerm, "tab:blue")] + ([("single RM", baseline, "tab:gray")] if baseline else [])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(cats), 4), layout="constrained")
    handles = []
    for m, (label, results, color) in enumerate(models):
        xs = [x - 0.4 + width * (m + 0.5) for x in range(len(cats))]
        acc = [results.get(c, {}).get("accuracy", float("nan")) for c in cats]
        bounds = [wilson_interval(a, int(results.get(c, {}).get("pairs", 0))) for a, c in zip(acc, cats)]
        # clipped at 0: at an accuracy of exactly 0 or 1 the bound equals it up to float rounding
        yerr = [[max(0.0, a - lo) for a, (lo, _) in zip(acc, bounds)],
                [max(0.0, hi - a) for a, (_, hi) in zip(acc, bounds)]]
        handles.append(ax.bar(xs, acc, width=width, color=color, label=label))
        ax.errorbar(xs, acc, yerr=yerr, fmt="none", ecolor="black", capsize=3, linewidth=1)
    handles.append(ax.axhline(CHANCE, color="red", linestyle="--", linewidth=1, label="chance (0.5)"))
    ax.set_xticks(range(len(cats)), [f"{c}\n({int(dmoerm[c].get('pairs', 0))} pairs)" for c in cats])
    ax.set_ylim(0, 1)
    ax.set_xlabel("category (held-out test pairs)")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title("pairwise accuracy by category (bars: 95% Wilson interval)")
    _legend_below(fig, handles, ncol=len(handles))
    return fig
