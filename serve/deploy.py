"""Deploy the reward server from its Serve config, the way ``serve run serve/config.yaml`` does.

    python -m serve.deploy --model models:/dmoerm-demo@champion [--config serve/config.yaml] [--port 8000]
    dmoerm serve --model ...                                   # the same, from the library's CLI

Starts a local Ray instance (or joins ``--address``), deploys every application of the config with the
given overrides, waits until it is running, prints the URL and a curl call, and keeps serving until
Ctrl-C. Tests deploy the shipped config through :func:`deploy` too, so what they test is what ships.
"""

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "serve" / "config.yaml"
logger = logging.getLogger("dmoerm.serve")


def load_serve_config(path: str | Path = DEFAULT_CONFIG, args: dict | None = None,
                      deployments: dict[str, dict] | None = None, http: dict | None = None) -> dict:
    """The Serve config at ``path`` with its (single) application's ``args`` and per-deployment settings
    updated, e.g. ``deployments={"AdapterPool": {"autoscaling_config": {...}}}``."""
    cfg = yaml.safe_load(Path(path).read_text())
    cfg = copy.deepcopy(cfg)
    if http:
        cfg.setdefault("http_options", {}).update(http)
    app = cfg["applications"][0]
    app.setdefault("args", {}).update(args or {})
    by_name = {d["name"]: d for d in app.setdefault("deployments", [])}
    for name, opts in (deployments or {}).items():
        if name not in by_name:
            by_name[name] = {"name": name}
            app["deployments"].append(by_name[name])
        for key, value in opts.items():
            if isinstance(value, dict) and isinstance(by_name[name].get(key), dict):
                by_name[name][key] = {**by_name[name][key], **value}
            else:
                by_name[name][key] = value
    return cfg


def deploy(cfg: dict, timeout_s: float = 300.0) -> None:
    """Deploy ``cfg`` (a Serve config dict) on the connected Ray cluster and wait until every app runs."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's own lines stay in its log files
    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    deadline = time.time() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: (apps[n].status if n in apps else "NOT_STARTED") for n in names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploying the reward server failed: {failed}")
        if time.time() > deadline:
            raise TimeoutError(f"the reward server did not start within {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def curl_example(url: str, token_env: str | None = None) -> str:
    auth = f' -H "Authorization: Bearer ${token_env}"' if token_env else ""
    body = json.dumps({"messages": [{"role": "user", "content": "How do I bake bread?"}],
                       "responses": ["Mix flour, water, salt and yeast, knead, let it rise, bake at 230C.",
                                     "No idea."]})
    return f"curl -s {url}/v1/reward -H 'Content-Type: application/json'{auth} -d '{body}'"


def _log_dir() -> str:
    """The local Ray session's log folder (replica logs included)."""
    import ray

    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except AttributeError:
        return "the Ray session folder (ray status)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a bundle folder")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="a running Ray cluster")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    args = p.parse_args(argv)
    import ray

    cfg = load_serve_config(args.config, {"model": args.model, "tracking_uri": args.tracking_uri},
                            http={"host": args.host, "port": args.port})
    if args.address:
        ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 logging_level=logging.WARNING, log_to_driver=False)
    try:
        deploy(cfg)
    except (RuntimeError, TimeoutError, ValueError) as e:
        print(f"dmoerm serve: error: {e}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}"
    token_env = cfg["applications"][0]["args"].get("auth_token_env", "DMOERM_SERVE_TOKEN")
    print(f"serving {args.model} at {url} (OpenAPI: {url}/docs)", flush=True)
    print(curl_example(url, token_env if os.environ.get(token_env) else None), flush=True)
    if args.address:  # deployed on a cluster: it keeps serving there (serve shutdown / serve status)
        return 0
    print(f"Ctrl-C stops it; Ray's and the replicas' logs: {_log_dir()}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
