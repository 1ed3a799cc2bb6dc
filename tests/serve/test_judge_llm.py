"""serve/judge_llm.py: the judge server's launch command and Ray Serve LLM config. vLLM cannot run here, so
what is checked is what this project writes: the ``vllm serve`` command line (executed against a stand-in
``vllm`` executable that records its argv and environment), the Serve config against the installed Ray's
Serve schema and Ray Serve LLM's ``LLMConfig`` model, the client settings the labelling config takes, and
the error when vLLM is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # serve/ is the checkout's Ray layer, not an installed package
    sys.path.insert(0, str(REPO))

from dmoerm.labeling import JudgeConfig  # noqa: E402
from serve.judge_llm import (  # noqa: E402
    RAY_SERVE_LLM_APP,
    JudgeServerConfig,
    judge_client_settings,
    ray_serve_config,
    vllm_serve_command,
)

CFG = JudgeServerConfig(model="Qwen/Qwen2.5-7B-Instruct", served_model_name="judge", tensor_parallel_size=2,
                        max_model_len=8192, host="0.0.0.0", port=8100,
                        engine_kwargs={"enable_prefix_caching": True, "enforce_eager": False})


def run_launcher(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.judge_llm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_vllm_serve_command_maps_every_argument():
    assert vllm_serve_command(CFG) == [
        "vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--host", "0.0.0.0", "--port", "8100",
        "--served-model-name", "judge", "--tensor-parallel-size", "2", "--dtype", "auto",
        "--gpu-memory-utilization", "0.9", "--seed", "0", "--max-model-len", "8192", "--enable-prefix-caching"]
    plain = vllm_serve_command(JudgeServerConfig(model="m"))
    assert plain[plain.index("--served-model-name") + 1] == "m" and "--max-model-len" not in plain


def test_serve_config_is_valid_for_the_installed_ray():
    from ray.serve.schema import ServeDeploySchema

    cfg = ray_serve_config(CFG)
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("ray.serve.llm", "build_openai_app") == tuple(RAY_SERVE_LLM_APP.split(":"))
    source = Path(importlib.util.find_spec(module).origin).read_text()  # importing it needs vLLM
    assert f"def {attr}(" in source, f"the installed ray has no {RAY_SERVE_LLM_APP}"
    [llm] = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "judge", "model_source": "Qwen/Qwen2.5-7B-Instruct"}
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 2 and llm["engine_kwargs"]["max_model_len"] == 8192
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8100}


def test_llm_config_matches_ray_serve_llms_model():
    try:  # ray.serve.llm itself imports vLLM; its LLMConfig's pydantic base does not
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    except ImportError as e:  # pragma: no cover - the module moved in another Ray version
        pytest.skip(f"Ray Serve LLM's LLMConfig is not importable without vLLM in this Ray: {e}")
    [llm] = ray_serve_config(CFG)["applications"][0]["args"]["llm_configs"]
    parsed = LLMConfig.model_validate(llm)
    assert (parsed.model_id, parsed.engine_kwargs["tensor_parallel_size"]) == ("judge", 2)
    with pytest.raises(ValueError, match="model_idx|model_loading_config"):  # the check can fail
        LLMConfig.model_validate({**llm, "model_loading_config": {"model_idx": "judge"}})


def test_client_settings_reach_this_server():
    settings = judge_client_settings(CFG)
    assert settings == {"base_url": "http://127.0.0.1:8100/v1", "model": "judge", "api_key_env": "VLLM_API_KEY"}
    JudgeConfig(**settings)  # what labels.judge accepts
    assert judge_client_settings(CFG, host="vllm-judge.ml.svc")["base_url"] == "http://vllm-judge.ml.svc:8100/v1"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        JudgeServerConfig(model="m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="max_replicas"):
        JudgeServerConfig(model="m", min_replicas=2, max_replicas=1)


def test_print_and_serve_config_outputs():
    args = ["--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "judge", "--tensor-parallel-size", "2",
            "--max-model-len", "8192", "--host", "0.0.0.0", "--port", "8100", "--engine-arg",
            "enable_prefix_caching=true", "--engine-arg", "enforce-eager=false"]
    printed = run_launcher(*args, "--print")
    assert printed.returncode == 0, printed.stderr
    assert shlex.split(printed.stdout) == vllm_serve_command(CFG)
    assert "'model': 'judge'" in printed.stderr
    serve_cfg = run_launcher(*args, "--serve-config", "-")
    assert serve_cfg.returncode == 0, serve_cfg.stderr
    assert yaml.safe_load(serve_cfg.stdout) == ray_serve_config(CFG)


def test_without_vllm_the_launcher_says_to_install_the_gpu_extra():
    if shutil.which("vllm"):
        pytest.skip("vllm is installed here")
    result = run_launcher("--model", "m")
    assert result.returncode == 2
    assert "install the gpu extra" in result.stderr


def test_launcher_execs_vllm_serve_with_the_key_in_the_environment_only(tmp_path):
    """A stand-in ``vllm`` executable records what it was started with (vLLM itself cannot run here)."""
    record = tmp_path / "started.json"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}}, "
                    f"open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    key = "sk-planted-judge-server-key-41c9"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "MY_JUDGE_KEY": key}
    env.pop("VLLM_API_KEY", None)
    result = run_launcher("--model", "m", "--port", "8123", "--api-key-env", "MY_JUDGE_KEY", env=env)
    assert result.returncode == 0, result.stderr
    started = json.loads(record.read_text())
    assert started["argv"] == vllm_serve_command(JudgeServerConfig(model="m", port=8123))[1:]
    assert started["key"] == key
    assert key not in " ".join(started["argv"]) + result.stdout + result.stderr
