"""One recipe, two executors: ``dmoerm train``'s in-process executor and the Ray job's executor run the same
stage function on the same config and seed, so they reach the same stage keys and write bundles whose
rewards agree on the test rows.

The config is the job tests' tiny task (two routed categories that prefer opposite answers, one capability
expert each labelled from a preference dataset, phase 1 / phase 3 / validation / test split by prompt),
the same stage graph as ``configs/demo.yaml`` on a model that trains in seconds; the demo itself takes
about 10 minutes per executor here. The aggregator search is off: its two implementations (Ray Tune with
concurrent trials, Optuna one trial at a time) are different algorithms over the same space, so with it on
the executors agree on every stage but the search."""

from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import run_job, write_config, write_task

from dmoerm.bundle import load_bundle
from dmoerm.config import load_config
from dmoerm.pipeline import train_locally
from dmoerm.stages.data import splits_of
from dmoerm.stages.store import StageStore

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
NO_SEARCH = "platform.tune.enabled=false"


def _rewards(bundle: str, samples) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_bundle(bundle)
    dmoerm = [s.reward for row in loaded.model.score_samples(samples) for s in row]
    baseline = [r for row in loaded.baseline.score_samples(samples) for r in row]
    return torch.tensor(dmoerm, dtype=torch.float64), torch.tensor(baseline, dtype=torch.float64)


def test_in_process_and_ray_executors_build_the_same_bundle(tmp_path, tiny_bert_dir, torch_single_thread):
    data = write_task(tmp_path, n=60)
    config = write_config(tmp_path, tiny_bert_dir, data, str(tmp_path / "unused"), None, name="agree")
    local = train_locally(load_config(config, [NO_SEARCH, f"platform.storage_uri={tmp_path / 'local'}",
                                               f"output_dir={tmp_path / 'out'}"]))
    ray_run = run_job(config, NO_SEARCH, f"platform.storage_uri={tmp_path / 'ray'}")

    assert ray_run["evaluation"] == local.evaluation  # the same stage graph: same inputs, same keys
    ray_store = StageStore(str(tmp_path / "ray"))
    ray_bundle = ray_store.path("evaluate", ray_run["evaluation"], "bundle")
    route_key = next(p.name for p in (tmp_path / "ray" / "stages" / "route").iterdir())
    test = splits_of(ray_store, "route", route_key)["test"]
    assert len(test) >= 20
    local_rewards, local_baseline = _rewards(local.bundle_uri, test)
    ray_rewards, ray_baseline = _rewards(str(ray_bundle), test)
    diff = (local_rewards - ray_rewards).abs().max().item()
    base_diff = (local_baseline - ray_baseline).abs().max().item()
    print(f"\nmax |reward difference| over {len(local_rewards)} test responses: DMoERM {diff:.3g}, "
          f"single RM {base_diff:.3g}")
    assert diff <= 1e-5 and base_diff <= 1e-5, (diff, base_diff)
    assert local.report["table"] == ray_store.get_json("evaluate", ray_run["evaluation"], "report.json")["table"]
