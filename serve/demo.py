"""The end of ``make demo``: serve the model the pipeline just registered, score one conversation through
``POST /v1/reward``, print the answer and the commands to do it yourself. Ray's and Serve's own lines go to
``<output_dir>/logs/serve-<model>-<time>.log`` (``--verbose``: to the terminal too).

    python -m serve.demo --config configs/demo.yaml
"""

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONVERSATION = [{"role": "user",
                 "content": "Can you help me write a polite note to my neighbour about their loud music?"}]
RESPONSES = ["Of course. Try: 'Hi! I hope you're well. Would you mind turning the music down after 10pm? Thanks!'",
             "Just call the police on them."]


def latest_version(tracking_uri: str, name: str) -> str:
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri).search_model_versions(f"name='{name}'")
    if not versions:
        raise ValueError(f"no version of {name!r} is registered at {tracking_uri}: run the pipeline first")
    return str(max(int(v.version) for v in versions))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--verbose", action="store_true", help="every log line on the terminal too (Ray Serve's)")
    args = p.parse_args(argv)
    import ray

    from dmoerm.client import RewardClient
    from dmoerm.config import load_config
    from dmoerm.runlog import log_dir, log_to_file
    from dmoerm.tracking import tracking_uri_of
    from serve.deploy import curl_example, deploy, load_serve_config

    cfg = load_config(args.config)
    tracking = tracking_uri_of(cfg.platform)
    name = cfg.platform.registered_model or cfg.name
    model = f"models:/{name}/{latest_version(tracking, name)}"
    log = (log_dir(cfg.platform.storage_uri, cfg.output_dir)
           / f"serve-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
    if not args.verbose:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the replicas' lines reach the log file uncoloured
    with log_to_file(log, args.verbose) as terminal:
        out = functools.partial(print, file=terminal, flush=True)
        out(f"\nserving {model} (Ray Serve: ingress, router, adapter pool); log (Serve's and its replicas'): {log}")
        t0 = time.time()
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env}, logging_level=logging.WARNING)
        try:
            deploy(load_serve_config(args={"model": model, "tracking_uri": tracking}, http={"port": args.port}))
            url = f"http://127.0.0.1:{args.port}"
            with RewardClient(url) as client:
                answer = client.reward(CONVERSATION, RESPONSES)
            out(f"ready in {time.time() - t0:.0f} s at {url}; POST /v1/reward answered:")
            out(json.dumps({k: answer[k] for k in ("model", "version", "category", "category_prob", "rewards",
                                                   "capability_scores")}, indent=2))
            out("\nserve it yourself, then call it:")
            out(f"  .venv/bin/dmoerm serve --model {model} --tracking-uri {tracking}")
            out(f"  {curl_example(url)}")
        except BaseException:
            out(f"serve.demo: failed; the whole log is in {log}")
            raise
        finally:
            ray.shutdown()  # ends Serve with it (a separate serve.shutdown() only adds Ray's retry warnings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
