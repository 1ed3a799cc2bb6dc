"""Phase 2 on Ray: the experts in worker groups (``dmoerm.stages.expert_groups``: which experts share one),
each group paying its start-up and backbone load once and training its experts one after another, each
exactly as it trains alone, under its own stage key.

A ``trainer`` group is one Ray Train ``TorchTrainer`` (data-parallel workers, checkpointed every epoch in
shared storage, its worker group restarted from the last checkpoint after a worker or node failure); the
others are one plain Ray task each (retried on failure, skipping its finished experts and resuming the one in
progress from its stage folder's epoch checkpoint). Every group streams each expert's DONE info as the
expert finishes, and ``each_expert`` hands them on in that order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dmoerm.config import PipelineConfig
from dmoerm.stages.expert_groups import ExpertGroup
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import checkpoint_hooks, train_expert_step
from dmoerm.storage import join_uri
from dmoerm.training.loop import FitHooks

EXPERT_FILE = "expert.json"
"""In a group's Ray Train checkpoint: the stage key of the expert whose training state it holds, and where
it was written (``_placement``)."""


def _placement(group: str) -> dict:
    """Where an expert trained (recorded in its DONE info and metrics)."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "group": group}


def _train_loop(config: dict) -> None:
    """One worker of a group's trainer: ``train_expert_step`` for each unfinished expert of the group in turn,
    with Ray Train's checkpoints and DDP (rank 0 saves each expert); a restarted worker group skips the
    finished experts and resumes the one its last checkpoint belongs to."""
    from dmoerm.checkpoint import load_state, save_state

    cfg: PipelineConfig = config["cfg"]
    store: StageStore = config["store"]
    experts = config["experts"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.platform.expert_resources.cpus_per_worker)))
    # the device Ray gave this worker (its GPU with use_gpu, else cpu), unless the config pins the CPU
    device = torch.device("cpu") if cfg.model.device == "cpu" else ray.train.torch.get_device()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=str(device)))
    resume, resume_key = None, None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)
            owner = Path(d) / EXPERT_FILE
            # a checkpoint without the file is a one-expert trainer's from before groups
            resume_key = json.loads(owner.read_text())["key"] if owner.exists() else experts[0][1]

    def wrap(model: torch.nn.Module) -> torch.nn.Module:  # ``model`` is on ``device`` already
        if world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    for inputs, key in experts:
        if store.done("experts", key) is not None:
            continue

        def checkpoint(state: dict, key: str = key) -> None:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    save_state(d, state)
                    (Path(d) / EXPERT_FILE).write_text(json.dumps({"key": key, **_placement(config["group"])}))
                ray.train.report({"expert": key, "epoch": state["epoch"], "step": state["step"]},
                                 checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)

        hooks = FitHooks(checkpoint=checkpoint, resume=resume if resume_key == key else None, shard=(rank, world),
                         progress=False)
        train_expert_step(cfg, store, inputs, key, hooks, wrap=wrap, placement=_placement(config["group"]))


def _expert_info(store: StageStore, key: str, seconds: float) -> dict:
    """An expert's DONE info for the driver, with its training curves (``metrics``) when this run trained it
    and ``seconds``: its share of its group's wall time (the group's start-up included for the first)."""
    done = store.done("experts", key)
    if done is None:
        raise RuntimeError(f"expert {key} finished without saving its adapter")
    info = {**done, "key": key, "seconds": round(seconds, 1)}
    if done.get("run") == store.run_id:
        info["metrics"] = json.loads(store.path("experts", key, "metrics.json").read_text())
    return info


@ray.remote(num_returns="streaming")
def _train_group_task(cfg: PipelineConfig, store: StageStore, group: ExpertGroup) -> Iterator[dict]:
    """A small group in one plain Ray task (its resources are set by ``launch_expert_groups``)."""
    logging.basicConfig(level=logging.INFO)  # its stage lines reach the job's log, like every stage task's
    torch.set_num_threads(max(1, int(cfg.platform.expert_resources.cpus_per_worker)))
    placement, last = _placement(group.name), time.time()
    for inputs, key in group.experts:
        if store.done("experts", key) is None:
            train_expert_step(cfg, store, inputs, key, checkpoint_hooks(store, "experts", key), placement=placement)
        yield _expert_info(store, key, time.time() - last)
        last = time.time()


@ray.remote(num_cpus=0, num_returns="streaming")
def _fit_group(cfg: PipelineConfig, store: StageStore, group: ExpertGroup) -> Iterator[dict]:
    """A group's ``TorchTrainer`` to completion, yielding each expert as its DONE appears in the store."""
    res = cfg.platform.expert_resources
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "store": store, "experts": list(group.experts), "group": group.name},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker, **res.resources}),
        run_config=RunConfig(name=group.name, storage_path=join_uri(store.root, "ray_train"),
                             failure_config=FailureConfig(max_failures=res.max_failures)),
    )
    pending, last = [k for _, k in group.experts], time.time()
    with ThreadPoolExecutor(1) as pool:
        fit = pool.submit(trainer.fit)
        while pending:
            finished = fit.done()
            for key in [k for k in pending if store.done("experts", k) is not None]:
                pending.remove(key)
                yield _expert_info(store, key, time.time() - last)
                last = time.time()
            if finished:
                break
            time.sleep(1.0)
        fit.result()  # the trainer's error, if it failed
    if pending:
        raise RuntimeError(f"worker group {group.name} finished without saving experts {pending}")


def launch_expert_groups(cfg: PipelineConfig, store: StageStore, groups: list[ExpertGroup]) -> list:
    """Start every group (concurrently, as the cluster allows); one stream of expert infos per group. A
    trainer's driving task stays on this process's node (Ray Train puts the trainer's controller beside it),
    so losing another node loses only workers, which the trainer replaces."""
    res = cfg.platform.expert_resources
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    task = _train_group_task.options(num_cpus=res.cpus_per_worker, num_gpus=1 if res.use_gpu else 0,
                                     resources=res.resources or None, max_retries=res.max_failures)
    return [_fit_group.options(scheduling_strategy=here).remote(cfg, store, g) if g.trainer
            else task.remote(cfg, store, g) for g in groups]


def each_expert(streams: list) -> Iterator[dict]:
    """The experts' DONE infos (``_expert_info``) as they finish, whichever group they are in."""
    live = list(streams)
    while live:
        [stream], _ = ray.wait(live, num_returns=1)
        try:
            ref = next(stream)
        except StopIteration:
            live.remove(stream)
            continue
        yield ray.get(ref)
