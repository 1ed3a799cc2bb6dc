"""The LLM judge's server side: an OpenAI-compatible vLLM endpoint for ``labels.source: judge``
(``dmoerm.labeling.judge`` speaks OpenAI chat completions to it).

    python -m serve.judge_llm --model Qwen/Qwen2.5-7B-Instruct --served-model-name judge \\
        --tensor-parallel-size 2 --max-model-len 8192 --host 0.0.0.0 --port 8000       # runs `vllm serve ...`
    python -m serve.judge_llm --model ... --print                                      # prints that command
    python -m serve.judge_llm --model ... --serve-config judge-serve.yaml              # Ray Serve LLM instead
    serve deploy judge-serve.yaml          # (or the serveConfigV2 of a KubeRay RayService)

Either way the labelling config then says (also printed by this launcher)::

    labels: {source: judge, judge: {base_url: http://HOST:8000/v1, model: judge, api_key_env: VLLM_API_KEY}}

Secrets: ``vllm serve`` checks the key held by ``$VLLM_API_KEY`` (set it from a Kubernetes secret; with
``--api-key-env NAME`` the launcher copies ``$NAME`` into it); the key never appears on a command line.
The Ray Serve LLM app checks no key: keep it on a private network.

Both paths need vLLM (the ``gpu`` extra, Linux with CUDA). Nothing here has run a vLLM server: no machine
of ours has vLLM. What the tests check: the command line and the Serve config this builds (the latter
against the installed Ray's Serve schema and its ``LLMConfig`` model), and the error without vLLM.
Followed: ``vllm serve`` flags as documented at https://docs.vllm.ai/en/stable/cli/serve.html and
https://docs.vllm.ai/en/stable/serving/openai_compatible_server.html; Ray Serve LLM's ``LLMConfig`` and
``build_openai_app({"llm_configs": [...]})`` at https://docs.ray.io/en/latest/serve/llm/quick-start.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

VLLM_KEY_ENV = "VLLM_API_KEY"
RAY_SERVE_LLM_APP = "ray.serve.llm:build_openai_app"
NO_VLLM = ("the vllm command is not installed here: install the gpu extra (pip install 'dmoerm[gpu]', Linux "
           "with CUDA), or run this where the image with the gpu extra runs (cluster/)")


@dataclass
class JudgeServerConfig:
    """What a user sets to serve a judge model."""

    model: str
    """Hugging Face id or local folder of the judge model."""
    served_model_name: str | None = None
    """The name clients send as ``model`` (``labels.judge.model``, part of the judge cache's key); ``None``:
    ``model`` itself."""
    tensor_parallel_size: int = 1
    """GPUs the model is split over (one replica)."""
    max_model_len: int | None = None
    """Context length; ``None``: the model's own. Lower it when the KV cache does not fit."""
    dtype: str = "auto"
    """``auto``, ``bfloat16``, ``float16`` or ``float32``."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM takes (weights + KV cache)."""
    host: str = "127.0.0.1"
    """Bind address; ``0.0.0.0`` inside a pod behind a Kubernetes Service."""
    port: int = 8000
    seed: int = 0
    """vLLM's seed (the client asks for temperature 0 anyway)."""
    min_replicas: int = 1
    """Ray Serve LLM only: autoscaling bounds of the judge deployment."""
    max_replicas: int = 1
    accelerator_type: str | None = None
    """Ray Serve LLM only: a GPU type of the cluster (e.g. ``A10G``, ``L4``); ``None``: any GPU."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """More vLLM engine arguments (``enable_prefix_caching: true``, ...): ``--enable-prefix-caching`` for
    ``vllm serve``, ``engine_kwargs`` for Ray Serve LLM."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("JudgeServerConfig.model must name the judge model (a hub id or a folder)")
        for name in ("tensor_parallel_size", "min_replicas", "max_replicas"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"JudgeServerConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_replicas < self.min_replicas:
            raise ValueError("JudgeServerConfig.max_replicas must be >= min_replicas")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"JudgeServerConfig.max_model_len must be >= 1 or null, got {self.max_model_len!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("JudgeServerConfig.gpu_memory_utilization must be in (0, 1]")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"JudgeServerConfig.port must be a TCP port, got {self.port!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"JudgeServerConfig.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def engine_args(self) -> dict[str, Any]:
        """vLLM engine arguments (``vllm.EngineArgs`` names) shared by both launch paths."""
        args: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size, "dtype": self.dtype,
                                "gpu_memory_utilization": self.gpu_memory_utilization, "seed": self.seed}
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return {**args, **self.engine_kwargs}


def vllm_serve_command(cfg: JudgeServerConfig) -> list[str]:
    """``vllm serve MODEL --host ... --port ... --served-model-name ...`` plus the engine arguments as
    ``--dashed-flags`` (``True``: the bare flag; ``False``/``None``: left out)."""
    cmd = ["vllm", "serve", cfg.model, "--host", cfg.host, "--port", str(cfg.port),
           "--served-model-name", cfg.name]
    for key, value in cfg.engine_args().items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def ray_serve_config(cfg: JudgeServerConfig, app_name: str = "judge") -> dict[str, Any]:
    """A Ray Serve config (``serve deploy``, or a RayService's ``serveConfigV2``) running Ray Serve LLM's
    OpenAI app with one model: routes ``/v1/chat/completions`` and ``/v1/models`` at ``route_prefix /``."""
    llm_config: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.name, "model_source": cfg.model},
        "engine_kwargs": cfg.engine_args(),
        "deployment_config": {"autoscaling_config": {"min_replicas": cfg.min_replicas,
                                                     "max_replicas": cfg.max_replicas}},
    }
    if cfg.accelerator_type:
        llm_config["accelerator_type"] = cfg.accelerator_type
    return {"proxy_location": "HeadOnly", "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [{"name": app_name, "route_prefix": "/", "import_path": RAY_SERVE_LLM_APP,
                              "args": {"llm_configs": [llm_config]}}]}


def judge_client_settings(cfg: JudgeServerConfig, host: str | None = None) -> dict[str, str]:
    """The ``labels.judge`` fields that reach this server (``host``: how clients address it)."""
    where = host or ("127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host)
    return {"base_url": f"http://{where}:{cfg.port}/v1", "model": cfg.name, "api_key_env": VLLM_KEY_ENV}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = JudgeServerConfig(model="-")
    p.add_argument("--model", required=True, help="judge model: Hugging Face id or local folder")
    p.add_argument("--served-model-name", default=None, help="name clients send as model (default: --model)")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--host", default=d.host, help="bind address (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--min-replicas", type=int, default=d.min_replicas, help="Ray Serve LLM only")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas, help="Ray Serve LLM only")
    p.add_argument("--accelerator-type", default=None, help="Ray Serve LLM only, e.g. A10G")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another vLLM engine argument (YAML value), e.g. enable_prefix_caching=true")
    p.add_argument("--api-key-env", default=VLLM_KEY_ENV,
                   help=f"NAME of the variable holding the API key, copied into ${VLLM_KEY_ENV} for vllm serve")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--print", action="store_true", help="print the vllm serve command and exit")
    out.add_argument("--serve-config", metavar="FILE", help="write the Ray Serve LLM config to FILE ('-': stdout)")
    return p


def config_from_args(args: argparse.Namespace) -> JudgeServerConfig:
    import yaml

    engine: dict[str, Any] = {}
    for item in args.engine_arg:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg {item!r} must look like key=value")
        engine[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    fields = {f.name for f in dataclasses.fields(JudgeServerConfig)} - {"engine_kwargs"}
    return JudgeServerConfig(**{k: v for k, v in vars(args).items() if k in fields}, engine_kwargs=engine)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"judge_llm: error: {e}", file=sys.stderr)
        return 2
    client = judge_client_settings(cfg)
    hint = f"labels.judge for this server: {client}"
    if args.serve_config:
        import yaml

        text = yaml.safe_dump(ray_serve_config(cfg), sort_keys=False)
        if args.serve_config == "-":
            sys.stdout.write(text)
        else:
            with open(args.serve_config, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {args.serve_config}: deploy it with `serve deploy {args.serve_config}`", file=sys.stderr)
        print(hint, file=sys.stderr)
        return 0
    cmd = vllm_serve_command(cfg)
    if args.print:
        print(" ".join(cmd))
        print(hint, file=sys.stderr)
        return 0
    if shutil.which(cmd[0]) is None:
        print(f"judge_llm: error: {NO_VLLM}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.api_key_env != VLLM_KEY_ENV and os.environ.get(args.api_key_env):
        env[VLLM_KEY_ENV] = os.environ[args.api_key_env]
    print(hint, file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)  # vllm serve replaces this process (signals reach it directly)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
