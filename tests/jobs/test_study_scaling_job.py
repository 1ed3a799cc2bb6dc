"""The data-scaling study end to end: ``dmoerm study scaling`` (``tuning/study_scaling.py``) on the tiny
two-category task with a tiny random model, its trials as a Ray Tune grid on a local Ray instance, the report
in a real ``mlflow server``; the trunk stage runs once for every trial, and a re-run reuses every finished
trial."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import REPO, write_config, write_task

FRACTIONS, COUNTS = [0.5, 1.0], [1, 2]


def _result(out: str) -> dict:
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_bert_dir, mlflow_server, local_ray):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    folder = tmp_path_factory.mktemp("study-scaling")
    data = write_task(folder, n=60)
    config = write_config(folder, tiny_bert_dir, data, str(folder / "storage"), mlflow_server.tracking_uri,
                          name="tiny-scaling")
    raw = yaml.safe_load(Path(config).read_text())
    raw["output_dir"] = str(folder / "out")
    raw["study"] = {"fractions": FRACTIONS, "num_categories": COUNTS, "num_bootstrap": 300, "max_concurrent": 2}
    Path(config).write_text(yaml.safe_dump(raw))
    return folder, config


@pytest.fixture(scope="module")
def first(study):
    import io
    from contextlib import redirect_stdout

    from dmoerm.cli import main  # `dmoerm study scaling` runs tuning/study_scaling.py (dmoerm.studies.STUDIES)

    folder, config = study
    runs = []
    for _ in range(2):  # the re-run with the same inputs
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["study", "scaling", "--config", config]) == 0
        runs.append(buf.getvalue())
    return folder, runs


@pytest.mark.ray
@pytest.mark.slow
def test_every_trial_runs_on_the_one_shared_trunk(first):
    folder, (out, _) = first
    res = _result(out)
    assert sorted((t["subset"]["fraction"], t["subset"]["num_categories"]) for t in res["trials"]) == \
        sorted((f, c) for f in FRACTIONS for c in COUNTS)
    assert res["shared_ran"]["trunk"]
    assert [p.name for p in (folder / "storage" / "stages" / "trunk").iterdir()] == [res["shared"]["trunk"]]
    for t in res["trials"]:  # each trial trained both models itself, and read the trunk from the shared stage
        assert "trunk" not in t["stages_ran"] and "data" not in t["stages_ran"]
        assert {"route", "labels", "baseline", "evaluate"} <= set(t["stages_ran"])


@pytest.mark.ray
@pytest.mark.slow
def test_the_numbers_the_table_and_the_logged_report(first, mlflow_server):
    from mlflow import MlflowClient

    from dmoerm.stages.store import StageStore

    folder, (out, _) = first
    res = _result(out)
    report = json.loads(Path(res["paths"]["json"]).read_text())
    trials = {(t["subset"]["fraction"], t["subset"]["num_categories"]): t for t in report["trials"]}
    store = StageStore(str(folder / "storage"))
    for (f, c), t in trials.items():
        assert t["categories"] == ["alpha", "beta"][:c]
        assert t["train_samples"]["dmoerm"] == t["train_samples"]["single"]  # the same subset for both models
        outcomes = store.get_json("evaluate", t["evaluation"], "pair_outcomes.json")
        single = store.get_json("evaluate", t["evaluation"], "baseline_pair_outcomes.json")
        assert {o[0] for o in outcomes.values()} == set(t["categories"])  # the included categories' test set
        for cat in [*t["categories"], "overall"]:
            mine = [k for k, o in outcomes.items() if cat in ("overall", o[0])]
            row = next(r for r in report["rows"] if (r["fraction"], r["num_categories"], r["category"]) == (f, c, cat))
            assert row["test_pairs"] == len(mine)
            assert row["dmoerm_accuracy"] == pytest.approx(sum(outcomes[k][1] for k in mine) / len(mine))
            assert row["single_accuracy"] == pytest.approx(sum(single[k][1] for k in mine) / len(mine))
            assert row["dmoerm_low"] <= row["dmoerm_accuracy"] <= row["dmoerm_high"]
            assert row["delta_low"] <= row["delta"] <= row["delta_high"]
    # a category's test pairs are the same in every trial that includes it; more data, more samples learnt from
    alpha = {k: r["test_pairs"] for r in report["rows"] if r["category"] == "alpha"
             for k in [(r["fraction"], r["num_categories"])]}
    assert len(set(alpha.values())) == 1
    for c in COUNTS:
        assert trials[(0.5, c)]["train_samples"]["dmoerm"] < trials[(1.0, c)]["train_samples"]["dmoerm"]
    table = Path(res["paths"]["table"]).read_text()
    assert table.strip() in out and "overall" in table and "0.50    1 alpha" in table
    client = MlflowClient(mlflow_server.tracking_uri)
    names = {a.path for a in client.list_artifacts(res["run_id"], "plots")} | \
        {a.path for a in client.list_artifacts(res["run_id"], "study")}
    assert names == {"plots/accuracy_by_fraction.png", "plots/accuracy_by_categories.png", "study/table.txt",
                     "study/results.csv", "study/results.json"}
    run = client.get_run(res["run_id"])
    overall = next(r for r in report["rows"]
                   if (r["fraction"], r["num_categories"], r["category"]) == (1.0, 2, "overall"))
    assert run.data.metrics["f1.c2.overall.dmoerm_accuracy"] == pytest.approx(overall["dmoerm_accuracy"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_reuses_every_finished_trial(first):
    _, (out, again) = first
    res, res2 = _result(out), _result(again)
    assert all(t["stages_ran"] == [] for t in res2["trials"]), res2["trials"]
    assert not any(res2["shared_ran"].values())
    def table(printed: str) -> str:  # the study's table (Tune prints its own header box before it)
        return printed[printed.index("fraction cats"):printed.index("plots:")]

    assert table(again) == table(out)
    assert res2["shared"] == res["shared"]
