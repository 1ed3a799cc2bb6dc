"""The best-of-N study's arithmetic and report (``dmoerm.studies``), Ray-free: the analytic KL, the
selection estimator on a hand-made example and against brute force, the bootstrap band, the alpaca-bon
loader on the real files, the config, the table/plot/raw writers."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import random
from pathlib import Path

import pytest

from dmoerm.studies.bon import (
    ORACLE,
    analytic_kl,
    best_of_n,
    bon_curves,
    bon_report,
    load_alpaca_bon,
    load_bon_config,
)
from dmoerm.studies.report import Table, bootstrap_mean

REPO = Path(__file__).resolve().parents[1]

# 3 prompts x 4 candidates: (proxy, gold). Expected best-of-n gold, by hand (module docstring's estimator:
# sorted by proxy, the j-th smallest is the max of a random n-subset with probability C(j, n-1) / C(4, n)).
HAND = [
    # sorted golds [1, 2, 3, 0]: n=1 6/4; n=2 (0*1 + 1*2 + 2*3 + 3*0)/6 = 8/6; n=4 the top-proxy one: 0
    ([0.1, 0.4, 0.3, 0.2], [1.0, 0.0, 3.0, 2.0], {1: 1.5, 2: 4 / 3, 4: 0.0}),
    # proxy agrees with gold, sorted golds [1, 2, 3, 4]: n=2 (1*2 + 2*3 + 3*4)/6 = 20/6
    ([4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], {1: 2.5, 2: 10 / 3, 4: 4.0}),
    # ties: proxy 0 for golds {1, 3}, proxy 1 for golds {0, 2}. n=4: the proxy-1 pair at random -> 1.
    # n=2 over the 6 pairs: {0-proxy pair} 2, {1-proxy pair} 1, the 4 mixed pairs pick golds 0, 2, 0, 2 -> 7/6
    ([1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 3.0], {1: 1.5, 2: 7 / 6, 4: 1.0}),
]


def test_analytic_kl_of_best_of_n():
    assert analytic_kl(1) == 0.0
    assert analytic_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert analytic_kl(4) == pytest.approx(1.3862944 - 0.75)
    assert analytic_kl(16) == pytest.approx(2.7725887 - 15 / 16)
    with pytest.raises(ValueError, match="n must be >= 1"):
        analytic_kl(0)


@pytest.mark.parametrize("proxy,gold,expected", HAND)
def test_best_of_n_on_the_hand_made_example(proxy, gold, expected):
    for n, value in expected.items():
        assert best_of_n(proxy, gold, n)[0] == pytest.approx(value), n
    assert best_of_n(proxy, gold, 4)[1] == max(proxy)  # the pick's proxy at n = K is the maximum
    with pytest.raises(ValueError, match="best-of-8 needs at least 8"):
        best_of_n(proxy, gold, 8)


def test_bon_curves_average_the_hand_made_prompts_over_prompts():
    points = bon_curves({"rm": [p for p, _, _ in HAND]}, [g for _, g, _ in HAND], [1, 2, 4], num_bootstrap=50)
    mine = {p.n: p for p in points if p.model == "rm"}
    assert {n: p.gold for n, p in mine.items()} == pytest.approx({1: 11 / 6, 2: 35 / 18, 4: 5 / 3})
    assert [p.kl for p in mine.values()] == pytest.approx([0.0, analytic_kl(2), analytic_kl(4)])
    assert mine[1].proxy == pytest.approx(0.0, abs=1e-12), "z-scored proxy: a random pick averages 0"
    oracle = {p.n: p.gold for p in points if p.model == ORACLE}
    assert oracle[1] == pytest.approx(11 / 6) and oracle[4] == pytest.approx((3 + 4 + 3) / 3)
    with pytest.raises(ValueError, match="best-of-8 needs 8 candidates"):
        bon_curves({"rm": [p for p, _, _ in HAND]}, [g for _, g, _ in HAND], [8])


def test_estimator_equals_the_average_over_every_subset_and_tie_break():
    rng = random.Random(3)
    for _ in range(20):
        k = rng.randint(2, 6)
        proxy = [float(rng.randint(0, 3)) for _ in range(k)]  # ties on purpose
        gold = [rng.random() for _ in range(k)]
        for n in range(1, k + 1):
            picks = []
            for subset in itertools.combinations(range(k), n):
                top = max(proxy[i] for i in subset)
                tied = [i for i in subset if proxy[i] == top]
                picks.append(sum(gold[i] for i in tied) / len(tied))
            assert best_of_n(proxy, gold, n)[0] == pytest.approx(sum(picks) / len(picks))


def test_bootstrap_interval_covers_the_mean():
    rng = random.Random(0)
    values = [rng.gauss(0.3, 1.0) for _ in range(200)]
    mean, low, high = bootstrap_mean(values, 2000, 0.95, seed=1)
    assert mean == pytest.approx(sum(values) / len(values))
    assert low < 0.3 < high and low < mean < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.2)  # the normal-theory width
    covered = 0
    for rep in range(100):  # ~95% of datasets' intervals hold the true mean
        data = [rng.gauss(0.3, 1.0) for _ in range(40)]
        _, lo, hi = bootstrap_mean(data, 400, 0.95, seed=rep)
        covered += lo <= 0.3 <= hi
    assert 85 <= covered <= 100


def test_load_alpaca_bon_reads_the_gold_as_preference_minus_one(shared_data):
    root = shared_data / "alpaca-bon"
    c = load_alpaca_bon(root, max_prompts=5, samples=[0, 2, 3])
    assert len(c.ids) == 5 and all(len(r) == 3 for r in c.responses)
    folder = root / "bon_eval/alpaca_eval_n=16/annotations/annotations_ref=GPT35t"
    raw = json.loads((folder / "tulu-2-dpo-13b.2/weighted_alpaca_eval_gpt4_turbo/annotations.json").read_text())
    assert c.contexts[0][0].content == raw[0]["instruction"] and c.contexts[0][0].role == "user"
    assert c.responses[0][1] == raw[0]["output_2"]
    assert c.gold[0][1] == pytest.approx(raw[0]["preference"] - 1.0)
    assert all(0.0 <= g <= 1.0 for row in c.gold for g in row)
    samples = c.samples()
    assert samples[4].responses == c.responses[4] and samples[4].id == c.ids[4]
    with pytest.raises(ValueError, match=r"tulu-2-dpo-13b\.\[99\] not found"):
        load_alpaca_bon(root, samples=[0, 99])


def test_the_example_config_loads_and_bad_settings_are_named():
    cfg = load_bon_config(REPO / "configs/study_bon.yaml")
    assert cfg.ns == [1, 2, 4, 8] and [s.kind for s in cfg.scorers] == ["dmoerm", "baseline"]
    assert cfg.candidates.alpaca_bon.path == str((REPO.parent / "shared/data/alpaca-bon").resolve())
    assert cfg.registry_uri.startswith("sqlite:////"), "a relative SQLite file is made absolute"
    with pytest.raises(ValueError, match="ns: best-of-n needs powers of two"):
        load_bon_config(REPO / "configs/study_bon.yaml", ["ns=[1,3]"])
    with pytest.raises(ValueError, match=r"scorers\[0\].kind: 'bogus'"):
        load_bon_config(data={"bundle": "x", "scorers": [{"name": "a", "kind": "bogus"}]})
    with pytest.raises(ValueError, match="candidates.generate is not set"):
        load_bon_config(data={"bundle": "x", "candidates": {"source": "generate"}})


def test_report_table_plot_and_raw_numbers(tmp_path):
    rewards = {"good": [[g + 0.1 * i for i, g in enumerate(row)] for _, row, _ in HAND],
               "bad": [[-g for g in row] for _, row, _ in HAND]}
    points = bon_curves(rewards, [g for _, g, _ in HAND], [1, 2, 4], num_bootstrap=100)
    report = bon_report(points, title="hand-made")
    text = report.table.format()
    assert text.splitlines()[0].startswith("hand-made: gold and proxy reward")
    assert sum(line.startswith(("good ", "bad ", ORACLE)) for line in text.splitlines()) == 9
    rows = list(csv.DictReader(io.StringIO(report.raw["bon_points.csv"])))
    assert [(r["model"], int(r["n"])) for r in rows][:3] == [("good", 1), ("good", 2), ("good", 4)]
    assert float(rows[0]["gold_low"]) <= float(rows[0]["gold"]) <= float(rows[0]["gold_high"])
    assert json.loads(report.raw["bon_points.json"])["rows"][5]["model"] == "bad"
    assert report.metrics["gold.good.n4"] == pytest.approx(points[2].gold)
    fig = report.figures["bon_reward_vs_kl.png"]
    gold_ax, proxy_ax = fig.axes[:2]
    assert "nats" in gold_ax.get_xlabel() and "0-1" in gold_ax.get_ylabel() and "std units" in proxy_ax.get_ylabel()
    assert fig.legends and {t.get_text() for t in fig.legends[0].get_texts()} >= {"good", "bad", ORACLE,
                                                                                  "random candidate (N=1)"}
    assert "bootstrap interval" in fig.get_suptitle()
    fig.savefig(tmp_path / "bon.png")
    assert (tmp_path / "bon.png").read_bytes()[:4] == b"\x89PNG"


def test_table_formats_nan_as_a_dash():
    lines = Table("t", ["a", "b"], [["x", float("nan")], ["y", 0.5]]).format().splitlines()
    assert [line.split() for line in lines[-2:]] == [["x", "-"], ["y", "0.500"]]
