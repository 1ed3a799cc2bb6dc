"""Phase 2 on Ray Train: one TorchTrainer per capability expert, data-parallel across its workers,
checkpointed every epoch in shared storage and resumed from there after a worker failure."""

from __future__ import annotations

import json
import os
import tempfile
import time

import ray
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dmoerm.config import PipelineConfig
from dmoerm.stages.steps import ExpertInputs, save_expert, train_expert_step
from dmoerm.stages.store import StageStore


def _train_loop(config: dict) -> None:
    from dmoerm.checkpoint import load_state, save_state

    cfg: PipelineConfig = config["cfg"]
    store = StageStore(config["storage"], run_id=config["run_id"])
    inputs: ExpertInputs = config["inputs"]
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

    curves: dict[str, list[list[float]]] = {"train_loss": [], "val_accuracy": []}
    fail_at = config.get("fail_at_step")

    def log_metric(name: str, value: float, step: int) -> None:
        if rank == 0:
            curves[name.rsplit("/", 1)[-1]].append([step, value])
        marker = config.get("fail_marker")
        if fail_at and step == fail_at and rank == 0 and marker and not os.path.exists(marker):
            open(marker, "w").close()  # noqa: SIM115 - fail once: the marker survives the crash
            # A training worker dies mid-run (tests). Ray Train's controller registers a reported
            # checkpoint asynchronously; a real crash comes well after the last one, so wait a little.
            time.sleep(5)
            os._exit(1)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model)

    tensors, result = train_expert_step(cfg, store, inputs, shard=(rank, world), wrap=wrap, resume=resume,
                                        checkpoint=checkpoint, log_metric=log_metric)
    if rank == 0:
        store.put_json("experts", config["key"], "metrics.json",
                       {**curves, "history": result.history,
                        "resumed_from_step": result.resumed_from_step, "workers": world})
        save_expert(store, config["key"], tensors, {"val_accuracy": result.best_val_accuracy, "steps": result.steps,
                                                    "resumed_from_step": result.resumed_from_step,
                                                    "workers": world})
    ray.train.report({"done": 1, "resumed_from_step": result.resumed_from_step})


@ray.remote(num_cpus=0)
def fit_expert(cfg: PipelineConfig, storage: str, run_id: str, inputs: ExpertInputs, key: str,
               fail_at_step: int | None = None) -> dict:
    """Run one expert's TorchTrainer to completion (a Ray task, so experts train concurrently)."""
    res = cfg.platform.expert_resources
    store = StageStore(storage, run_id=run_id)
    if (done := store.done("experts", key)) is not None:
        return {**done, "key": key}
    t0 = time.time()
    name = f"expert-{inputs.category}-{inputs.capability}-{key}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "storage": storage, "run_id": run_id, "inputs": inputs, "key": key,
                           "fail_at_step": fail_at_step,
                           "fail_marker": str(store.local("experts", key) / "injected_failure")},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=_train_storage(storage),
                             failure_config=FailureConfig(max_failures=res.max_failures)),
    )
    trainer.fit()
    done = store.done("experts", key)
    if done is None:
        raise RuntimeError(f"expert {inputs.category}/{inputs.capability} finished without saving its adapter")
    return {**done, "key": key, "seconds": round(time.time() - t0, 1),
            "metrics": json.loads(store.path("experts", key, "metrics.json").read_text())}


def _train_storage(storage: str) -> str:
    """Ray Train's checkpoint folder: beside the stages (``s3://`` works with AWS_ENDPOINT_URL set)."""
    from dmoerm.storage import is_s3, join_uri

    return join_uri(storage, "ray_train") if is_s3(storage) else os.path.abspath(os.path.join(storage, "ray_train"))
