"""MLflow tracking for pipeline runs: one parent run, child runs per stage and per expert, metrics,
plots as artifacts, and the embedded defaults (a SQLite store beside local storage, artifacts beside it).
MLflow is imported inside the functions; secrets never reach it (the config holds only the NAMES of
environment variables)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmoerm.configtools import to_dict

if TYPE_CHECKING:
    from dmoerm.config import PlatformConfig

logger = logging.getLogger(__name__)
SECRET_WORDS = ("key", "token", "secret", "password")


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
    """Config -> ``{"phase1.lr": "0.0001", ...}``; values under secret-looking keys are dropped."""
    out: dict[str, str] = {}
    data = to_dict(obj)
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if any(w in str(k).lower() for w in SECRET_WORDS) and not str(k).endswith("_env"):
                continue
            out.update(flatten_params(v, key))
    else:
        out[prefix] = str(data)[:500]
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
        self.log_figure(self.run_id, plot_confusion(report["confusion"], report["categories"]),
                        "router_confusion.png")
        self.log_figure(self.run_id, plot_accuracy(report["dmoerm"], report["baseline"]), "accuracy_by_category.png")
        self.client.log_text(self.run_id, report["table"], "evaluation/table.txt")


# ---- plots --------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], title: str):
    """Training curve: train loss and validation accuracy per evaluation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="train loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["val_accuracy"] for h in history], color="tab:orange", label="val accuracy")
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.legend(loc="lower left")
    return fig


def plot_confusion(matrix: list[list[int]], categories: list[str]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(categories), 1 + 0.8 * len(categories)))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(categories)), categories, rotation=45)
    ax.set_yticks(range(len(categories)), categories)
    ax.set_xlabel("routed")
    ax.set_ylabel("true")
    ax.set_title("router confusion matrix")
    return fig


def plot_accuracy(dmoerm: dict, baseline: dict | None):
    """Per-category pairwise accuracy, DMoERM vs the single-RM baseline."""
    plt = _plt()
    cats = list(dmoerm)
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(cats), 3))
    xs = range(len(cats))
    ax.bar([x - 0.2 for x in xs], [dmoerm[c]["accuracy"] for c in cats], width=0.4, label="DMoERM")
    if baseline:
        ax.bar([x + 0.2 for x in xs], [baseline.get(c, {}).get("accuracy", 0) for c in cats], width=0.4,
               label="single RM")
    ax.set_xticks(list(xs), cats)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pairwise accuracy")
    ax.legend()
    return fig
