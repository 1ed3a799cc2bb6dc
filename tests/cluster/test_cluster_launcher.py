"""cluster/launcher/aws.yaml is a valid Ray cluster launcher config (the JSON schema inside the installed
``ray`` package, then Ray's own validate_config on it with the provider's defaults filled in) and keeps the
project's rules; every check fails on a copy broken in the way it guards against."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cluster.checks import launcher_problems, ray_schema

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "cluster" / "launcher" / "aws.yaml"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_the_schema_is_the_one_inside_ray():
    import ray.autoscaler

    schema = ray_schema()
    assert (Path(ray.autoscaler.__file__).parent / "ray-schema.json").exists()
    assert set(schema["required"]) == {"cluster_name", "provider"}
    assert "available_node_types" in schema["properties"]


def test_shipped_launcher_config_passes_every_check(launcher):
    assert launcher_problems(launcher, "aws.yaml") == []
    types = launcher["available_node_types"]
    assert types["gpu_train"]["resources"]["GPU"] >= 1 and types["gpu_serve"]["resources"]["GPU"] >= 1
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}


def _commands(key: str, old: str, new: str):
    def edit(cfg: dict) -> None:
        cfg[key] = [c.replace(old, new) for c in cfg[key]]
        assert any(new in c for c in cfg[key]), f"the edit {old!r} -> {new!r} did not apply to {key}"
    return edit


def _set(path: str, value):
    def edit(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


BROKEN = [
    ("unknown top-level key", _set("head_node_typo", "head"), "Additional properties"),
    ("GPU count as a string", _set("available_node_types.gpu_train.resources", {"CPU": 48, "GPU": "4"}),
     "available_node_types/gpu_train/resources/GPU"),
    ("head type not a node type", _set("head_node_type", "nope"), "head_node_type` must be one of"),
    ("min workers above the global max", lambda c: (_set("max_workers", 1)(c),
                                                    _set("available_node_types.cpu.min_workers", 2)(c)),
     "smaller than the sum of `min_workers`"),
    ("public node addresses", _set("provider.use_internal_ips", False), "use_internal_ips"),
    ("dashboard on every interface", _commands("head_start_ray_commands", "--dashboard-host=127.0.0.1",
                                               "--dashboard-host=0.0.0.0"), "must bind 127.0.0.1"),
    ("MLflow on every interface", _commands("head_start_ray_commands", '--host "$HEAD_IP"', "--host 0.0.0.0"),
     "mlflow server must bind a private address"),
    ("token auth off on workers", _commands("worker_start_ray_commands", "RAY_AUTH_MODE=token",
                                            "RAY_AUTH_MODE=disabled"), "worker_start_ray_commands: Ray token auth"),
    ("a literal token", _set("setup_commands", ["export RAY_AUTH_TOKEN=abc123 && true"]), "literal value"),
    ("a token file mount", _set("file_mounts", {"~/.ray/auth_token": "./auth_token"}), "never from files"),
    ("no serving GPU type", _set("available_node_types.gpu_serve", KeyError), "no GPU worker type for serve"),
    ("no autoscaling room", _set("available_node_types.cpu.max_workers", 0), "available_node_types.cpu: max_workers"),
    ("Ray's stock image", _set("docker.image", "rayproject/ray:2.60.0-gpu"), "docker.image"),
    ("no head start", _commands("head_start_ray_commands", "ray start --head", "ray start"),
     "no `ray start --head`"),
    ("no setup commands", _set("setup_commands", []), "setup_commands is empty"),
]


@pytest.mark.parametrize("what,edit,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_check_fails_on_a_broken_copy(launcher, what, edit, message):
    broken = copy.deepcopy(launcher)
    edit(broken)
    problems = launcher_problems(broken, "aws.yaml")
    assert any(message in p for p in problems), (what, problems)
    assert all(p.startswith("aws.yaml: ") for p in problems)
