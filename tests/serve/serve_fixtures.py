"""Shared pieces of the serving tests (imported as ``serve_fixtures``; conftest.py exposes the fixture).

One reward server for the serving tests: the shipped serve/config.yaml deployed on a local Ray instance
(through serve.deploy, as `dmoerm serve` does), serving a tiny bundle from a real `mlflow server`'s registry
(`models:/tiny-serve@champion`), bearer-token auth on, test-sized limits and fast autoscaling."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from services import free_port, mlflow_server  # noqa: F401  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-5f0c"  # a test secret: the replicas read it from their environment
MODEL = "tiny-serve"
LIMITS = {"max_body_bytes": 65536, "max_items": 8, "max_responses": 8, "max_text_chars": 4000}
TAXONOMY = {"chat": ["empathy", "logic"], "qa": ["correctness"]}


@dataclass
class Server:
    url: str
    token: str
    tracking_uri: str
    metrics_url: str
    bundles: dict[str, object] = field(default_factory=dict)  # registry version -> LoadedBundle (in process)
    paths: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = TOKEN, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def async_client(self, timeout: float = 60.0, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=timeout, **kwargs)


def make_bundle(folder: Path, base: str, seed: int) -> str:
    from tiny import TINY_LORA, build_reward_model, load_tiny

    from dmoerm.bundle import save_bundle
    from dmoerm.modeling.aggregator import AggregatorConfig

    backbone = load_tiny(base)
    model = build_reward_model(backbone, TAXONOMY, seed=seed)
    return save_bundle(folder / f"bundle-{seed}", model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0)


def register(tracking_uri: str, bundle: str) -> str:
    """Log ``bundle`` as the pyfunc model and register it as a new version of MODEL; returns the version."""
    import mlflow
    from mlflow import MlflowClient

    from dmoerm import registry
    from dmoerm.mlflow_model import log_bundle_model

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serve-tests")
    with mlflow.start_run() as run:
        info = log_bundle_model(bundle)
    mv = registry.register_version(MlflowClient(tracking_uri), MODEL, info.model_uri, run.info.run_id,
                                   model_id=info.model_id)
    return str(mv.version)


def set_champion(tracking_uri: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_registered_model_alias(MODEL, "champion", version)


@pytest.fixture(scope="package")
def server(tmp_path_factory, tiny_bert_dir, mlflow_server):  # noqa: F811
    import ray
    from ray import serve

    from dmoerm.bundle import load_bundle

    sys.path.insert(0, str(REPO))
    from serve.deploy import deploy, load_serve_config

    folder = tmp_path_factory.mktemp("serve")
    uri = mlflow_server.tracking_uri
    first = make_bundle(folder, tiny_bert_dir, seed=0)  # registered as v1, and served from its folder by "mux"
    version = register(uri, first)
    set_champion(uri, version)
    os.environ["DMOERM_SERVE_TOKEN"] = TOKEN
    metrics_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, _metrics_export_port=metrics_port)
    cfg = load_serve_config(
        args={"model": f"models:/{MODEL}@champion", "tracking_uri": uri, "require_auth": True,
              "reload_interval_s": 1, "torch_threads": 1, "limits": LIMITS, "template": "auto"},
        deployments={
            "AdapterPool": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                                   "upscale_delay_s": 1, "downscale_delay_s": 4,
                                                   "metrics_interval_s": 0.5, "look_back_period_s": 2},
                            "ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 2,
                            "graceful_shutdown_timeout_s": 5},
            "Router": {"ray_actor_options": {"num_cpus": 0.25}},
            "Ingress": {"ray_actor_options": {"num_cpus": 0.25}},
        },
        http={"port": http_port})
    mux = {**cfg["applications"][0], "name": "mux", "route_prefix": "/mux"}  # a second app, categories multiplexed
    mux["args"] = {**mux["args"], "model": first, "categories_per_replica": 1}
    mux["deployments"] = [{"name": "AdapterPool", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
                          {"name": "Router", "ray_actor_options": {"num_cpus": 0.25}},
                          {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.25}}]
    cfg["applications"].append(mux)
    try:
        deploy(cfg, timeout_s=240)
        srv = Server(f"http://127.0.0.1:{http_port}", TOKEN, uri, f"http://127.0.0.1:{metrics_port}/metrics")
        srv.paths[version] = first
        srv.bundles[version] = load_bundle(first)
        yield srv
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("DMOERM_SERVE_TOKEN", None)


def in_process(server: Server, version: str, contexts, responses, categories=None) -> list:
    """The same bundle's rewards computed in this process: what every endpoint must return."""
    return server.bundles[version].model.score(contexts, responses, categories)
