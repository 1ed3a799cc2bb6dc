"""Phase 2 on Ray Train: one TorchTrainer per capability expert, data-parallel across its workers,
checkpointed every epoch in shared storage and resumed from there after a worker failure."""

from __future__ import annotations

import json
import tempfile
import time

import ray
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dmoerm.config import PipelineConfig
from dmoerm.names import safe_name
from dmoerm.stages.store import StageStore
from dmoerm.stages.train import ExpertInputs, train_expert_step
from dmoerm.storage import join_uri
from dmoerm.training.loop import FitHooks


def _train_loop(config: dict) -> None:
    """One worker: ``train_expert_step`` with Ray Train's checkpoints and DDP (rank 0 saves the expert)."""
    from dmoerm.checkpoint import load_state, save_state

    cfg: PipelineConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.platform.expert_resources.cpus_per_worker)))
    resume = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)

    def checkpoint(state: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_state(d, state)
            ray.train.report({"epoch": state["epoch"], "step": state["step"]},
                             checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)

    hooks = FitHooks(checkpoint=checkpoint, resume=resume, shard=(rank, world), progress=False)
    result = train_expert_step(cfg, config["store"], config["inputs"], config["key"], hooks, wrap=wrap)
    ray.train.report({"done": 1, "resumed_from_step": result.resumed_from_step})


@ray.remote(num_cpus=0)
def fit_expert(cfg: PipelineConfig, store: StageStore, inputs: ExpertInputs, key: str) -> dict:
    """Run one expert's TorchTrainer to completion (a Ray task, so experts train concurrently); its DONE
    info with its training curves (``metrics``) and wall time."""
    if (done := store.done("experts", key)) is not None:
        return {**done, "key": key}
    res, t0 = cfg.platform.expert_resources, time.time()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "store": store, "inputs": inputs, "key": key},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RunConfig(name=f"expert-{safe_name(inputs.category)}-{safe_name(inputs.capability)}-{key}",
                             storage_path=join_uri(store.root, "ray_train"),
                             failure_config=FailureConfig(max_failures=res.max_failures)),
    )
    trainer.fit()
    done = store.done("experts", key)
    if done is None:
        raise RuntimeError(f"expert {inputs.category}/{inputs.capability} finished without saving its adapter")
    return {**done, "key": key, "seconds": round(time.time() - t0, 1),
            "metrics": json.loads(store.path("experts", key, "metrics.json").read_text())}
