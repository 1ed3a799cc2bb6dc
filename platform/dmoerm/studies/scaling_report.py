"""The data-scaling study's report: trial results aggregated into one table (rows: fraction x number of
categories x test category, with ``overall``), written as text, CSV and JSON, drawn as two plots, and
logged to MLflow.

Intervals: one seed -> the trial's bootstrap intervals (over test samples); several seeds -> the mean
accuracy with a t interval over the seeds' accuracies (the spread the training and the draw cause).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from dmoerm.studies.scaling import ScalingConfig

MODELS = ("dmoerm", "single")
LABELS = {"dmoerm": "DMoERM", "single": "single RM"}
PLOTS = ("accuracy_by_fraction.png", "accuracy_by_categories.png")


def _over_seeds(values: list[dict], confidence: float) -> dict[str, float]:
    """{accuracy, low, high}: the trial's own interval for one seed, a t interval over seeds otherwise."""
    if len(values) == 1:
        v = values[0]
        return {"accuracy": v["accuracy"], "low": v["low"], "high": v["high"]}
    from scipy import stats

    acc = [v["accuracy"] for v in values]
    mean = sum(acc) / len(acc)
    sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, len(acc) - 1) * sd / math.sqrt(len(acc))
    return {"accuracy": mean, "low": mean - half, "high": mean + half}


def aggregate(trials: list[dict], study: ScalingConfig) -> list[dict]:
    """One row per (fraction, number of categories, test category incl. ``overall``), seeds pooled."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in trials:
        for cat, m in t["metrics"].items():
            groups[(t["subset"]["fraction"], t["subset"]["num_categories"], cat)].append({**m, "trial": t})
    rows = []
    for (fraction, num_cats, cat), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                kv[0][2] == "overall", kv[0][2])):
        row = {"fraction": fraction, "num_categories": num_cats, "category": cat, "seeds": len(ms),
               "interval": "bootstrap over test samples" if len(ms) == 1 else f"t over {len(ms)} seeds",
               "test_pairs": ms[0]["dmoerm"]["pairs"],
               "train_samples": round(sum(m["trial"]["train_samples"]["dmoerm"] for m in ms) / len(ms))}
        for model in MODELS:
            agg = _over_seeds([m[model] for m in ms], study.confidence)
            row.update({f"{model}_{k}": v for k, v in agg.items()})
        delta = _over_seeds([{"accuracy": m["delta"]["value"], "low": m["delta"]["low"],
                              "high": m["delta"]["high"]} for m in ms], study.confidence)
        row.update({"delta": delta["accuracy"], "delta_low": delta["low"], "delta_high": delta["high"]})
        rows.append(row)
    return rows


def format_table(rows: list[dict], confidence: float) -> str:
    """The table the CLI prints and MLflow keeps."""
    pct = f"{confidence:.0%}"
    head = (f"{'fraction':>8} {'cats':>4} {'test category':<14} {'train':>6} {'pairs':>6}  "
            f"{'DMoERM [' + pct + ' CI]':<22} {'single RM [' + pct + ' CI]':<22} {'DMoERM - single':<24}")
    lines = [head, "-" * len(head)]
    def cell(r: dict, m: str) -> str:
        return f"{r[m + '_accuracy']:.3f} [{r[m + '_low']:.3f}, {r[m + '_high']:.3f}]"

    for r in rows:
        lines.append(f"{r['fraction']:>8.2f} {r['num_categories']:>4d} {r['category']:<14.14} {r['train_samples']:>6d} "
                     f"{r['test_pairs']:>6d}  {cell(r, 'dmoerm'):<22} {cell(r, 'single'):<22} "
                     f"{r['delta']:+.3f} [{r['delta_low']:+.3f}, {r['delta_high']:+.3f}]")
    seeds = {r["interval"] for r in rows}
    lines.append(f"train: distinct human-ranked samples each model learnt from (the same for both); pairs: held-out "
                 f"test pairs (the full test split of the included categories); intervals: {', '.join(sorted(seeds))}")
    return "\n".join(lines)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plt():
    from dmoerm.tracking import _plt as plt

    return plt()


def _line(ax, xs: list, rows: list[dict], model: str, style: dict, label: str):
    acc = [r[f"{model}_accuracy"] for r in rows]
    yerr = [[a - r[f"{model}_low"] for a, r in zip(acc, rows)], [r[f"{model}_high"] - a for a, r in zip(acc, rows)]]
    return ax.errorbar(xs, acc, yerr=yerr, capsize=3, marker="o", label=label, **style)


def plot_by_fraction(rows: list[dict], confidence: float):
    """Overall held-out accuracy against the share of training data, one line per model and number of
    categories, with intervals and the chance line."""
    from dmoerm.tracking import CHANCE

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    counts = sorted({r["num_categories"] for r in rows})
    handles = []
    for i, c in enumerate(counts):
        mine = [r for r in rows if r["category"] == "overall" and r["num_categories"] == c]
        for model, color in (("dmoerm", "tab:blue"), ("single", "tab:gray")):
            handles.append(_line(ax, [100 * r["fraction"] for r in mine], mine, model,
                                 {"color": color, "linestyle": ["-", "--", ":", "-."][i % 4]},
                                 f"{LABELS[model]}, {c} categor{'y' if c == 1 else 'ies'}"))
    handles.append(ax.axhline(CHANCE, color="red", linestyle="--", linewidth=1, label="chance (0.5)"))
    ax.set_ylim(0, 1)
    ax.set_xlabel("training data used (% of each included category's samples)")
    ax.set_ylabel("held-out pairwise accuracy (fraction of pairs)")
    ax.set_title(f"Data scaling: accuracy by amount of training data ({confidence:.0%} intervals)")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small", frameon=False)
    return fig


def plot_by_categories(rows: list[dict], confidence: float):
    """Accuracy on the first category's test pairs (present in every trial: the same pairs throughout)
    against the number of categories trained on, one line per model and fraction."""
    from dmoerm.tracking import CHANCE

    plt = _plt()
    first = next(r["category"] for r in rows if r["num_categories"] == min(x["num_categories"] for x in rows)
                 and r["category"] != "overall")
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    handles = []
    for i, f in enumerate(sorted({r["fraction"] for r in rows})):
        mine = sorted((r for r in rows if r["category"] == first and r["fraction"] == f),
                      key=lambda r: r["num_categories"])
        for model, color in (("dmoerm", "tab:blue"), ("single", "tab:gray")):
            handles.append(_line(ax, [r["num_categories"] for r in mine], mine, model,
                                 {"color": color, "linestyle": ["-", "--", ":", "-."][i % 4]},
                                 f"{LABELS[model]}, {f:.0%} of the data"))
    handles.append(ax.axhline(CHANCE, color="red", linestyle="--", linewidth=1, label="chance (0.5)"))
    ax.set_xticks(sorted({r["num_categories"] for r in rows}))
    ax.set_ylim(0, 1)
    ax.set_xlabel("task categories trained on (count, first of the taxonomy)")
    ax.set_ylabel(f"pairwise accuracy on {first!r} test pairs (fraction)")
    ax.set_title(f"Data scaling: accuracy by diversity of training data ({confidence:.0%} intervals)")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small", frameon=False)
    return fig


def write_report(rows: list[dict], trials: list[dict], study: ScalingConfig, folder: str | Path) -> dict[str, Path]:
    """table.txt, results.csv, results.json (rows and raw trial results) and the two plots in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"table": folder / "table.txt", "csv": folder / "results.csv", "json": folder / "results.json"}
    paths["table"].write_text(format_table(rows, study.confidence) + "\n")
    paths["csv"].write_text(to_csv(rows))
    paths["json"].write_text(json.dumps({"study": study.__dict__, "rows": rows, "trials": trials}, indent=1,
                                        default=str))
    plt = _plt()
    for name, draw in zip(PLOTS, (plot_by_fraction, plot_by_categories)):
        fig = draw(rows, study.confidence)
        paths[name] = folder / name
        fig.savefig(paths[name], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def log_report(tracking_uri: str, experiment: str, run_name: str, paths: dict[str, Path], rows: list[dict],
               params: dict) -> str:
    """One MLflow run: the study's parameters, a metric per row, the table, CSV, JSON and plots; its id."""
    from dmoerm.names import metric_name
    from dmoerm.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment, run_name=run_name)
    tracker.log_params(tracker.run_id, params)
    metrics = {}
    for r in rows:
        base = f"f{r['fraction']:g}.c{r['num_categories']}.{metric_name(r['category'])}"
        for model in MODELS:
            metrics[f"{base}.{model}_accuracy"] = r[f"{model}_accuracy"]
        metrics[f"{base}.delta"] = r["delta"]
    tracker.log_metrics(tracker.run_id, metrics)
    for name, path in paths.items():
        tracker.client.log_artifact(tracker.run_id, str(path), artifact_path="plots" if name in PLOTS else "study")
    tracker.finish(tracker.run_id)
    return tracker.run_id
