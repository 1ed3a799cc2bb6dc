"""The data-scaling study's pure parts: which samples a trial keeps (nested fractions, the fixed test set,
the first c categories), the trial's config, and the table's numbers and intervals on hand-made trial
results, and what its plots draw."""

from __future__ import annotations

import math

import pytest
import yaml

from dmoerm.data.records import Sample, Turn
from dmoerm.data.splits import SPLITS
from dmoerm.studies.scaling import (
    ScalingConfig,
    Subset,
    keep,
    load_study_config,
    subset_splits,
    trial_config,
    trial_metrics,
)
from dmoerm.studies.scaling_report import aggregate, format_table, plot_by_categories, plot_by_fraction
from dmoerm.tracking import CHANCE


def sample(i: int, cat: str) -> Sample:
    return Sample(id=f"{cat}-{i}", context=[Turn("user", f"q {cat} {i}")], responses=[f"a{i}", f"b{i}"],
                  ranks=[1, 2], category=cat)


SPLIT_SAMPLES = {name: [sample(i, c) for c in ("alpha", "beta", "gamma") for i in range(n)]
                 for name, n in zip(SPLITS, (200, 80, 20, 40))}
CATS = ["alpha", "beta", "gamma"]


def ids(samples: list[Sample]) -> set[str]:
    return {s.id for s in samples}


def test_fractions_are_nested_and_the_test_set_fixed():
    for c in (1, 2, 3):
        cats = CATS[:c]
        prev = None
        for f in (0.25, 0.5, 1.0):
            out = subset_splits(SPLIT_SAMPLES, Subset(f, c, 0), cats)
            assert {s.category for part in out.values() for s in part} == set(cats)
            for name in ("val", "test"):  # never subsampled: every trial of c categories sees the same pairs
                assert ids(out[name]) == {s.id for s in SPLIT_SAMPLES[name] if s.category in cats}
            for name in ("phase1", "phase3"):
                for cat in cats:
                    n = sum(s.category == cat for s in out[name])
                    total = sum(s.category == cat for s in SPLIT_SAMPLES[name])
                    assert abs(n - f * total) <= 4 * math.sqrt(total * f * (1 - f)) + 1, (name, cat, f, n)
                if prev is not None:
                    assert ids(prev[name]) < ids(out[name])  # the smaller subset inside the larger one
            prev = out
        assert ids(prev["phase1"]) == {s.id for s in SPLIT_SAMPLES["phase1"] if s.category in cats}  # f = 1: all


def test_a_sample_is_in_or_out_everywhere_and_the_seed_draws_another_subset():
    s = sample(3, "alpha")
    copy = Sample(id=s.id, context=s.context, responses=s.responses, ranks=s.ranks)  # e.g. in a label file
    assert all(keep(s, f, 0) == keep(copy, f, 0) for f in (0.1, 0.5, 0.9))
    pool = [sample(i, "alpha") for i in range(400)]
    assert {x.id for x in pool if keep(x, 0.5, 0)} != {x.id for x in pool if keep(x, 0.5, 1)}


def test_a_category_left_without_samples_is_an_error_naming_it():
    with pytest.raises(ValueError, match="split 'phase3' has no sample of category 'alpha'"):
        subset_splits({**SPLIT_SAMPLES, "phase3": [sample(0, "beta")]}, Subset(1.0, 2, 0), CATS[:2])


def _study_file(tmp_path, study: dict) -> str:
    raw = {"name": "s", "taxonomy": [{"name": "alpha", "capabilities": ["x"]}, {"name": "beta", "capabilities": ["y"]}],
           "data": {"sources": [{"path": "a.jsonl", "format": "dmoerm", "category": "alpha"},
                                {"path": "b.jsonl", "format": "dmoerm", "category": "beta"}]},
           "labels": {"datasets": {"x": [{"path": "a.jsonl", "format": "dmoerm"}],
                                    "y": [{"path": "b.jsonl", "format": "dmoerm"}]}},
           "platform": {"tune": {"enabled": True}}, "study": study}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_study_config_and_the_trial_config(tmp_path):
    cfg, study = load_study_config(_study_file(tmp_path, {"fractions": [0.5, 1.0]}), ["study.seeds=[3,4]"])
    assert study.fractions == [0.5, 1.0] and study.seeds == [3, 4] and study.num_categories == [1, 2]
    assert cfg.data.sources[0].path == str(tmp_path / "a.jsonl")  # resolved beside the file
    assert not cfg.platform.tune.enabled  # the shared stages and every trial train once, no search
    t = trial_config(cfg, Subset(0.5, 1, 3))
    assert [c.name for c in t.taxonomy] == ["alpha"] and t.seed == 3
    assert [s.category for s in t.data.sources] == ["alpha"] and set(t.labels.datasets) == {"x"}
    with pytest.raises(ValueError, match=r"study.num_categories: \[3\] exceed the taxonomy's 2"):
        load_study_config(_study_file(tmp_path, {"num_categories": [1, 3]}))
    with pytest.raises(ValueError, match="unknown config field.*study.fraction"):
        load_study_config(_study_file(tmp_path, {"fraction": [1.0]}))
    with pytest.raises(ValueError, match=r"study.fractions: values in \(0, 1\]"):
        ScalingConfig(fractions=[0.0, 1.0])


def outcomes(cat: str, correct: int, n: int, prefix: str = "") -> dict[str, list]:
    return {f"{prefix}{cat}-{i}#0>1": [cat, i < correct] for i in range(n)}


def trial(fraction: float, c: int, seed: int, d: dict, s: dict, study: ScalingConfig) -> dict:
    return {"subset": {"fraction": fraction, "num_categories": c, "seed": seed},
            "metrics": trial_metrics(d, s, study, seed=seed), "train_samples": {"dmoerm": 10, "single": 10}}


def test_trial_metrics_and_table_on_hand_made_outcomes():
    study = ScalingConfig(num_bootstrap=2000)
    d = {**outcomes("alpha", 80, 100), **outcomes("beta", 30, 50)}
    s = {**outcomes("alpha", 60, 100), **outcomes("beta", 30, 50)}
    m = trial_metrics(d, s, study)
    assert m["alpha"]["dmoerm"]["accuracy"] == 0.8 and m["alpha"]["single"]["accuracy"] == 0.6
    assert m["overall"]["dmoerm"]["accuracy"] == pytest.approx(110 / 150) and m["overall"]["dmoerm"]["pairs"] == 150
    assert m["alpha"]["delta"]["value"] == pytest.approx(0.2) and m["beta"]["delta"]["value"] == 0
    lo, hi = m["alpha"]["dmoerm"]["low"], m["alpha"]["dmoerm"]["high"]
    half = 1.96 * math.sqrt(0.8 * 0.2 / 100)  # the normal approximation's half width
    assert lo < 0.8 < hi and hi - lo == pytest.approx(2 * half, rel=0.2)
    assert 0 < m["alpha"]["delta"]["low"] < 0.2 < m["alpha"]["delta"]["high"]
    rows = aggregate([trial(1.0, 2, 0, d, s, study)], study)
    assert [r["category"] for r in rows] == ["alpha", "beta", "overall"]
    assert rows[0]["interval"] == "bootstrap over test samples" and rows[0]["dmoerm_low"] == lo
    table = format_table(rows, study.confidence)
    assert "0.800 [" in table and "+0.200 [" in table and "overall" in table


def test_several_seeds_give_a_t_interval_over_the_seeds():
    study = ScalingConfig(num_bootstrap=200)
    accs = (70, 80, 90)
    trials = [trial(0.5, 1, seed, outcomes("alpha", a, 100), outcomes("alpha", 50, 100), study)
              for seed, a in enumerate(accs)]
    overall = next(r for r in aggregate(trials, study) if r["category"] == "overall")
    assert overall["seeds"] == 3 and overall["interval"] == "t over 3 seeds"
    assert overall["dmoerm_accuracy"] == pytest.approx(0.8)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert (overall["dmoerm_low"], overall["dmoerm_high"]) == (pytest.approx(0.8 - half), pytest.approx(0.8 + half))
    assert overall["delta"] == pytest.approx(0.3)


def test_plots_draw_labelled_axes_intervals_a_legend_and_the_chance_line():
    study = ScalingConfig(num_bootstrap=200)
    trials = [trial(f, c, 0, {**outcomes("alpha", int(80 * f), 80), **outcomes("beta", 30, 40)},
                    {**outcomes("alpha", 50, 80), **outcomes("beta", 20, 40)}, study)
              for f in (0.25, 1.0) for c in (1, 2)]
    trials = [{**t, "metrics": {k: v for k, v in t["metrics"].items()
                                if t["subset"]["num_categories"] == 2 or k != "beta"}} for t in trials]
    rows = aggregate(trials, study)
    for fig, xunit in ((plot_by_fraction(rows, 0.95), "%"), (plot_by_categories(rows, 0.95), "count")):
        ax = fig.axes[0]
        assert ax.get_title().startswith("Data scaling") and xunit in ax.get_xlabel()
        assert "accuracy" in ax.get_ylabel()
        assert any(set(ln.get_ydata()) == {CHANCE} for ln in ax.get_lines())
        assert len(ax.containers) == 4  # two models x two lines, each with error bars
        assert len(fig.legends[0].get_texts()) == 5
    by_cats = plot_by_categories(rows, 0.95).axes[0]
    assert "'alpha'" in by_cats.get_ylabel()  # the category every trial is tested on


def test_the_shipped_study_config_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "study_scaling.yaml"
    cfg, study = load_study_config(str(path))
    assert [c.name for c in cfg.taxonomy] == ["helpful", "red_team"] and cfg.baseline
    assert study.fractions == [0.25, 0.5, 1.0] and study.num_categories == [1, 2]
    assert all(Path(s.path).is_absolute() and Path(s.path).exists() for s in cfg.data.sources)
