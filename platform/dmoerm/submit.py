"""Submit the pipeline to a Ray cluster through Ray's job API, follow it, read its status and logs:
``dmoerm submit pipeline`` / ``dmoerm status`` / ``dmoerm logs``.

The one module of the library that talks to Ray, and only through ``ray.job_submission``, imported inside
the functions: importing it (or ``dmoerm.cli``) needs no Ray. It also knows where the checkout's Ray
layers (``jobs/``, ``tuning/``, ``serve/``) are and which environment variables a job inherits.

Secrets never travel with a job: Ray keeps a job's ``runtime_env`` (its ``env_vars`` included) in the job
info that anyone with dashboard access can read. Only the non-secret :data:`FORWARD_ENV` variables are
forwarded; the job reads every secret (S3 keys, the judge's API key, MLflow credentials) from the
cluster's own environment: set them on the cluster's nodes (``ray start`` under them, or a Kubernetes
secret in the Ray pods' ``envFrom``). ``dmoerm submit`` names each secret variable it did not forward.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
               "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_DISABLE_TELEMETRY")
"""Non-secret environment variables a pipeline job and its workers get from the process that starts it
(one whose value carries credentials, ``https://user:pass@host``, is withheld like a secret)."""
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "DMOERM_SERVE_TOKEN")
"""Secret variables a job needs from the cluster's environment; never forwarded (the judge's
``labels.judge.api_key_env`` is added to them)."""


def _has_credentials(value: str) -> bool:
    from dmoerm.redact import redact_credentials

    return redact_credentials(value) != value


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARD_ENV` variables set here whose values carry no credentials, for a job's
    ``runtime_env`` (and a local Ray instance's, where workers inherit the rest of the environment)."""
    return {k: os.environ[k] for k in FORWARD_ENV if k in os.environ and not _has_credentials(os.environ[k])}


def withheld_env(secret_names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Secret variables set here that a job does NOT get (:data:`SECRET_ENV`, ``secret_names``, and forward
    variables whose values carry credentials): the cluster's nodes must have their own."""
    names = dict.fromkeys([*SECRET_ENV, *secret_names])
    out = [k for k in names if os.environ.get(k)]
    return out + [k for k in FORWARD_ENV if k in os.environ and _has_credentials(os.environ[k])]


def checkout_root() -> Path:
    """The dmoerm checkout holding the Ray layers: ``DMOERM_REPO``, else the folder above ``platform/`` of
    this (editable) install."""
    import dmoerm

    root = Path(os.environ.get("DMOERM_REPO") or Path(dmoerm.__file__).resolve().parents[2])
    if not (root / "jobs" / "run_pipeline.py").exists():
        raise ValueError(f"no jobs/run_pipeline.py under {root}: run from a dmoerm checkout or set DMOERM_REPO")
    return root


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def stage_working_dir(config: str, overrides: list[str]) -> tuple[str, str, list[str]]:
    """A minimal working dir for the job: the Ray layers and the fully resolved config (absolute data and
    storage paths, overrides applied), so nothing else of the checkout has to travel; also the names of the
    secret variables the config needs from the cluster (the judge's ``api_key_env``)."""
    import yaml

    from dmoerm.config import load_config
    from dmoerm.configtools import to_dict

    cfg = load_config(config, overrides)
    root, stage = checkout_root(), Path(tempfile.mkdtemp(prefix="dmoerm-job-"))
    for pkg in ("jobs", "tuning"):
        shutil.copytree(root / pkg, stage / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (stage / "job_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    carrying = _fields_with_credentials(to_dict(cfg))
    if carrying:
        print(f"warning: {', '.join(carrying)} carry credentials inside a URL: they travel in the job's files "
              f"(masked in its logs and MLflow params); prefer the cluster's environment for them", flush=True)
    judge = cfg.labels.judge if cfg.labels.source == "judge" else None
    return str(stage), "job_config.yaml", [judge.api_key_env] if judge and judge.api_key_env else []


def _fields_with_credentials(obj: object, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [f for k, v in obj.items() for f in _fields_with_credentials(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(obj, list):
        return [f for i, v in enumerate(obj) for f in _fields_with_credentials(v, f"{prefix}[{i}]")]
    return [prefix] if isinstance(obj, str) and _has_credentials(obj) else []


def submit(config: str, overrides: list[str], address: str | None = None, wait: bool = True) -> str:
    """Submit ``python -m jobs.run_pipeline`` with the resolved config; stream its logs when ``wait``."""
    import dmoerm

    client = _client(address)
    working_dir, cfg_name, secret_names = stage_working_dir(config, overrides)
    runtime_env = {"working_dir": working_dir, "py_modules": [str(Path(dmoerm.__file__).resolve().parent)],
                   "env_vars": forwarded_env()}
    withheld = withheld_env(secret_names)
    if withheld:
        print(f"not forwarded to the job (secrets; Ray shows a job's runtime_env to anyone with dashboard "
              f"access): {', '.join(withheld)}. The job reads them from the cluster's environment: set them on "
              f"the cluster's nodes (e.g. a Kubernetes secret in the Ray pods' envFrom).", flush=True)
    unset = [k for k in secret_names if not os.environ.get(k)]
    if unset:
        print(f"note: {', '.join(unset)} is not set here either; the job still reads it from the cluster's "
              f"environment", flush=True)
    try:
        job_id = _submit_with_retry(client, f"python -m jobs.run_pipeline --config {cfg_name}", runtime_env)
    finally:
        shutil.rmtree(working_dir, ignore_errors=True)
    print(f"submitted job {job_id}", flush=True)
    if wait:
        print(f"job {job_id}: {follow(job_id, address)}")
    return job_id


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, wait_s: float = 180.0) -> str:
    """A freshly started head refuses jobs until its job agent is up ("No available agent"): retry that."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow(job_id: str, address: str | None = None) -> str:
    """Stream a job's logs until it ends; print the MLflow run it reported; return the final status."""
    client = _client(address)
    result: dict = {}

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            for line in chunk.splitlines():
                if line.startswith("RESULT "):
                    result.update(json.loads(line[len("RESULT "):]))

    asyncio.run(tail())
    status = str(client.get_job_status(job_id))
    if result:
        print(f"MLflow run: {result.get('run_id')}  registered version: {result.get('version')}  "
              f"promoted: {result.get('promoted')}")
    return status


def status(job_id: str, address: str | None = None) -> str:
    info = _client(address).get_job_info(job_id)
    return f"{job_id}: {info.status} {info.message or ''}".strip()


def logs(job_id: str, address: str | None = None, follow_logs: bool = False) -> str:
    if follow_logs:
        return follow(job_id, address)
    return _client(address).get_job_logs(job_id)
