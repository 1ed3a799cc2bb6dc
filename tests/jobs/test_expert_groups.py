"""Phase 2's worker groups: the policy (which experts share a group), and on a local Ray instance that a
group of several experts (a plain task, or one TorchTrainer) trains each of them exactly as the in-process
executor does, each under its own stage key, streamed to the driver one by one.

The task: the job tests' two routed categories, with a second capability for ``alpha`` (3 experts)."""

from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch
from pipeline_fixtures import REPO, write_task
from safetensors.torch import load_file

from dmoerm.config import ResourceConfig, load_config
from dmoerm.stages.data import data_step
from dmoerm.stages.expert_groups import expert_rows, expert_slots, plan_expert_groups
from dmoerm.stages.labels import label_step
from dmoerm.stages.route import route_step
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import ExpertInputs, expert_key, expert_step, top_step, trunk_step

CAPS = {"alpha": ["alpha_taste", "alpha_echo"], "beta": ["beta_taste"]}


def _config(tmp, base: str, data: dict[str, str], **resources):
    raw = {
        "name": "groups", "seed": 0,
        "taxonomy": [{"name": c, "capabilities": caps} for c, caps in CAPS.items()],
        "data": {"sources": [{"path": p, "format": "dmoerm"} for p in data.values()],
                 "splits": {"phase1": 0.4, "phase3": 0.2, "val": 0.1, "test": 0.3}},
        "labels": {"source": "dataset", "datasets": {cap: [{"path": data[c], "format": "dmoerm"}]
                                                     for c, caps in CAPS.items() for cap in caps}},
        "model": {"base": base, "top_layers": 1, "max_length": 32, "feature_batch_size": 16,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},  # dropout on: the RNG must match too
        "router": {"train": {"lr": 0.01, "epochs": 5, "batch_size": 16, "patience": 5}},
        "phase1": {"lr": 5e-3, "epochs": 1, "batch_size": 16, "patience": 1},
        "phase2": {"lr": 5e-3, "epochs": 2, "batch_size": 16, "patience": 2},
        "baseline": False,
        "platform": {"storage_uri": str(tmp / "storage"), "experiment": "groups",
                     "expert_resources": {"max_failures": 0, **resources}},
    }
    return load_config(data=raw)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_bert_dir):
    """(cfg, store, expert inputs, keys, the in-process experts' adapters): the stages before phase 2 and
    every expert trained by ``expert_step`` (the in-process executor's), whose outputs are then removed."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("groups")
    cfg = _config(tmp, tiny_bert_dir, write_task(tmp, n=40))
    store = StageStore(cfg.platform.storage_uri, run_id="in-process")
    route = route_step(cfg, store, data_step(cfg, store))
    labels = label_step(cfg, store, route)
    trunk = trunk_step(cfg, store, route, labels)
    inputs = [ExpertInputs(route, labels, trunk, top_step(cfg, store, route, trunk, c), c, cap)
              for c, caps in CAPS.items() for cap in caps]
    keys = [expert_step(cfg, store, i) for i in inputs]
    assert keys == [expert_key(cfg, store, i) for i in inputs]
    adapters = {k: load_file(str(store.path("experts", k, "adapter.safetensors"))) for k in keys}
    shutil.rmtree(store.local_root / "stages" / "experts")
    return cfg, store, inputs, keys, adapters


def _with(cfg, **resources):
    res = dataclasses.replace(cfg.platform.expert_resources, **resources)
    return dataclasses.replace(cfg, platform=dataclasses.replace(cfg.platform, expert_resources=res))


def test_policy_groups_each_expert_once(upstream):
    cfg, store, inputs, keys, _ = upstream
    rows = [expert_rows(cfg, store, i) for i in inputs]
    assert all(r > 0 for r in rows) and rows[0] == rows[1]  # alpha's two experts: the same labelled rows

    def plan(slots: int, **res):
        groups = plan_expert_groups(_with(cfg, **res), store, inputs, keys, slots)
        assert sorted(k for g in groups for _, k in g.experts) == sorted(keys)  # every expert exactly once
        assert len({g.name for g in groups}) == len(groups)
        return groups

    assert [(len(g.experts), g.trainer) for g in plan(8, group="expert")] == [(1, True)] * 3
    by_category = {g.experts[0][0].category: g for g in plan(8, group="category")}
    assert [k for _, k in by_category["alpha"].experts] == keys[:2] and by_category["alpha"].trainer
    # auto, all small: as many plain-task groups as slots, balanced (3 experts of sizes a, a, b on 2 slots)
    auto = plan(2, group="auto")
    assert len(auto) == 2 and not any(g.trainer for g in auto)
    assert sorted(len(g.experts) for g in auto) == [1, 2]
    assert len(plan(1, group="auto")) == 1 and len(plan(8, group="auto")) == 3
    # auto, an expert at the threshold gets its own trainer; the others share the slots
    big = plan(2, group="auto", own_trainer_rows=max(rows))
    assert [g.trainer for g in big].count(True) == rows.count(max(rows))
    assert all(len(g.experts) == 1 for g in big if g.trainer)
    with pytest.raises(ValueError, match="2 keys"):
        plan_expert_groups(cfg, store, inputs, keys[:2], 2)


def test_slots_count_every_resource_a_worker_reserves():
    res = ResourceConfig(cpus_per_worker=2, resources={"gpu_type_a": 1})
    assert expert_slots(res, {"CPU": 8, "gpu_type_a": 3}) == 3
    assert expert_slots(res, {"CPU": 5, "gpu_type_a": 3}) == 2
    assert expert_slots(res, {"CPU": 8}) == 1  # none of the type yet: one group waits for it
    assert expert_slots(ResourceConfig(use_gpu=True), {"CPU": 16, "GPU": 4}) == 4
    with pytest.raises(ValueError, match="CPU and GPU come from"):
        ResourceConfig(resources={"CPU": 1})
    with pytest.raises(ValueError, match="own_trainer_rows"):
        ResourceConfig(own_trainer_rows=-1)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["auto", "category"])
def test_a_group_trains_each_expert_as_the_in_process_executor(upstream, local_ray, policy):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from jobs.train_experts import each_expert, launch_expert_groups

    cfg, store, inputs, keys, adapters = upstream
    cfg = _with(cfg, group=policy)
    ray_store = StageStore(cfg.platform.storage_uri, run_id=f"ray-{policy}")
    groups = plan_expert_groups(cfg, ray_store, inputs, keys, slots=2)
    shared = next(g for g in groups if len(g.experts) == 2)  # alpha's two experts (category) or the pair (auto)
    assert shared.trainer is (policy == "category")
    try:
        infos = list(each_expert(launch_expert_groups(cfg, ray_store, groups)))
        assert sorted(i["key"] for i in infos) == sorted(keys)  # one info per expert, as each finished
        for key in keys:
            done = ray_store.done("experts", key)
            assert done["run"] == f"ray-{policy}"  # trained here, none skipped
            trained = load_file(str(ray_store.path("experts", key, "adapter.safetensors")))
            assert trained.keys() == adapters[key].keys()  # its own adapter and value head, nothing else
            assert all(torch.equal(trained[n], adapters[key][n]) for n in trained), key
            assert ray_store.path("experts", key, "metrics.json").exists()
        members = [ray_store.done("experts", k) for _, k in shared.experts]
        assert {m["group"] for m in members} == {shared.name}  # one worker group trained both
        assert len({m["node_id"] for m in members}) == 1 and all(m["train_seconds"] > 0 for m in members)
    finally:
        shutil.rmtree(ray_store.local_root / "stages" / "experts", ignore_errors=True)
