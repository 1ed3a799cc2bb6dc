"""What must hold of the cluster definitions, as functions that return the problems they find (an empty
list: fine), each naming its file and field. The tests run them on the shipped files and on broken copies;
run them before applying a changed definition:

    python -m cluster.checks            # every file under cluster/launcher, cluster/kuberay, cluster/image

Launcher configs are validated against the JSON schema inside the installed ``ray`` package and by Ray's
own ``validate_config``; KubeRay manifests against the fields KubeRay's CRDs require (ray.io/v1:
``headGroupSpec.template``, each worker group's ``groupName``/``template``, the autoscaling bounds
``minReplicas``/``maxReplicas``, ``rayStartParams`` as strings) and this project's rules (kuberay_checks).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET", re.IGNORECASE)
PRIVATE_HOSTS = ("127.0.0.1", "localhost")
GPU = "nvidia.com/gpu"


def load_yaml_docs(path: str | Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


def ray_schema() -> dict:
    """The cluster launcher's JSON schema, as shipped inside the installed ``ray`` package."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _literal_secrets(text: str, where: str) -> list[str]:
    """``NAME=value`` shell assignments of a secret-named variable to a literal (not ``$VAR``/``$(...)``)."""
    out = []
    for m in re.finditer(r"(?<![\w.-])([A-Za-z_][A-Za-z0-9_]*)=(\S*)", text):
        name, value = m.groups()
        if SECRET_NAME.search(name) and value and not value.lstrip("\"'").startswith("$"):
            out.append(f"{where}: {name} is set to a literal value; read it from the environment or a secret store")
    return out


def _flag(command: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}(?:=|\s+)(\"[^\"]*\"|\S+)", command)
    return m.group(1).strip('"') if m else None


# ---- the Ray cluster launcher -------------------------------------------------------------------------
def launcher_problems(cfg: dict, where: str = "launcher config") -> list[str]:
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    problems = [f"{where}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(cfg)]
    if problems:
        return problems
    try:
        validate_config(fillout_defaults(cfg))
    except (ValueError, RuntimeError) as e:
        problems.append(f"{where}: Ray's validate_config: {e}")
    if not cfg.get("provider", {}).get("use_internal_ips"):
        problems.append(f"{where}: provider.use_internal_ips must be true (nodes on private addresses only)")
    image = (cfg.get("docker") or {}).get("image", "")
    if not image or image.startswith("rayproject/"):
        problems.append(f"{where}: docker.image must be the project's image (cluster/image/Dockerfile), got {image!r}")
    if not cfg.get("setup_commands"):
        problems.append(f"{where}: setup_commands is empty (check the image imports the project)")
    types = cfg.get("available_node_types", {})
    head_type = cfg.get("head_node_type")
    for name, t in types.items():
        if name == head_type:
            continue
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None or hi < max(lo, 1):
            problems.append(f"{where}: available_node_types.{name}: max_workers must be >= max(min_workers, 1), "
                            f"got min {lo} max {hi}")
    for role in ("train", "serve"):
        if not any(role in n and t.get("resources", {}).get("GPU", 0) >= 1 for n, t in types.items()):
            problems.append(f"{where}: available_node_types: no GPU worker type for {role} (a name containing "
                            f"{role!r} with resources.GPU >= 1)")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = "\n".join(cfg.get(key) or [])
        if not re.search(r"RAY_AUTH_MODE=token\b", text) or re.search(r"RAY_AUTH_MODE=(?!token\b)", text):
            problems.append(f"{where}: {key}: Ray token auth must be on (export RAY_AUTH_MODE=token before ray start)")
    head = "\n".join(cfg.get("head_start_ray_commands") or [])
    if "ray start --head" not in head:
        problems.append(f"{where}: head_start_ray_commands: no `ray start --head`")
    elif (host := _flag(head, "--dashboard-host")) not in PRIVATE_HOSTS:
        problems.append(f"{where}: head_start_ray_commands: the dashboard / job API must bind 127.0.0.1 "
                        f"(--dashboard-host=127.0.0.1; reach it with `ray dashboard`), got {host!r}")
    if "mlflow server" in head and (host := _flag(head, "mlflow server --host")) in (None, "0.0.0.0", "::", "[::]"):
        problems.append(f"{where}: head_start_ray_commands: mlflow server must bind a private address "
                        f"(--host \"$HEAD_IP\" or 127.0.0.1), got {host!r}")
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for i, command in enumerate(cfg.get(key) or []):
            problems += _literal_secrets(command, f"{where}: {key}[{i}]")
    for remote, local in (cfg.get("file_mounts") or {}).items():
        if "auth_token" in f"{remote} {local}" or SECRET_NAME.search(Path(str(local)).name):
            problems.append(f"{where}: file_mounts.{remote}: secrets come from the environment, never from files")
    return problems


# ---- the image ----------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    return out


def dockerfile_problems(text: str, where: str = "Dockerfile", constraints: str | None = None) -> list[str]:
    """The image: a CUDA runtime base, the repo at /app on PYTHONPATH, the project installed with its `gpu`
    extra under the repo's constraints.txt (its CPU torch pin rewritten to the same CUDA release)."""
    import subprocess
    import tempfile

    steps = dockerfile_instructions(text)
    problems: list[str] = []
    args = dict(re.match(r"([A-Za-z_]+)=?(.*)", a).groups() for k, a in steps if k == "ARG")
    bases = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), a) for k, a in steps if k == "FROM"]
    if not bases or not re.match(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-", bases[-1]):
        problems.append(f"{where}: FROM must be an nvidia/cuda *-runtime-* image, got {bases}")
    if ("WORKDIR", "/app") not in steps or not any(k == "COPY" and a.endswith(" /app") for k, a in steps):
        problems.append(f"{where}: the repo must be at /app (WORKDIR /app, COPY . /app): the manifests run it there")
    if not any(k == "ENV" and re.search(r"\bPYTHONPATH=/app\b", a) for k, a in steps):
        problems.append(f"{where}: ENV PYTHONPATH=/app is missing (jobs.*, serve.* import from the checkout)")
    runs = [a for k, a in steps if k == "RUN"]
    derive = next((c for r in runs for c in r.split("&&") if "constraints.txt >" in c), None)
    installs = [c for r in runs for c in r.split("&&") if "pip install" in c and re.search(r"\.\[([\w,]*)gpu", c)]
    if derive is None:
        problems.append(f"{where}: no RUN derives the GPU constraints from constraints.txt (`constraints.txt > FILE`)")
    if not installs:
        problems.append(f"{where}: no `pip install ... \".[gpu]\"`: the image must install the project's gpu extra")
    if derive is None or not installs:
        return problems
    target = derive.split(">")[-1].strip()
    if not all(re.search(rf"-c\s+{re.escape(target)}\b", c) for c in installs):
        problems.append(f"{where}: the gpu-extra install must use the derived constraints (-c {target}): {installs}")
    constraints = (REPO / "constraints.txt").read_text() if constraints is None else constraints
    with tempfile.TemporaryDirectory() as d:  # run the Dockerfile's own rewrite on the repo's constraints
        (Path(d) / "constraints.txt").write_text(constraints)
        cmd = derive.replace(target, "derived.txt")
        res = subprocess.run(["bash", "-c", cmd], cwd=d, capture_output=True, text=True)
        derived = (Path(d) / "derived.txt").read_text() if res.returncode == 0 else ""
    if res.returncode != 0:
        return problems + [f"{where}: the constraints rewrite failed: {cmd!r}: {res.stderr.strip()}"]
    want = [ln for ln in constraints.splitlines() if ln.strip() and not ln.startswith("#")]
    have = [ln for ln in derived.splitlines() if ln.strip() and not ln.startswith("#")]
    cpu = [ln for ln in want if ln.endswith("+cpu")]
    expect = [ln[: -len("+cpu")] if ln.endswith("+cpu") else ln for ln in want]
    if have != expect:
        problems.append(f"{where}: the rewritten constraints must equal constraints.txt with only the +cpu local "
                        f"versions dropped ({cpu}); got differences {sorted(set(have) ^ set(expect))}")
    return problems


def main(argv: list[str] | None = None) -> int:
    from cluster.kuberay_checks import manifest_problems

    problems = []
    for path in sorted((REPO / "cluster" / "launcher").glob("*.yaml")):
        problems += launcher_problems(yaml.safe_load(path.read_text()), str(path.relative_to(REPO)))
    for path in sorted((REPO / "cluster" / "kuberay").glob("*.yaml")):
        problems += manifest_problems(load_yaml_docs(path), str(path.relative_to(REPO)))
    dockerfile = REPO / "cluster" / "image" / "Dockerfile"
    problems += dockerfile_problems(dockerfile.read_text(), str(dockerfile.relative_to(REPO)))
    for p in problems:
        print(p, file=sys.stderr)
    print(f"cluster definitions: {len(problems)} problem(s)")
    return 1 if problems else 0


def walk(obj: Any, path: str = ""):
    """Every (path, dict) inside ``obj``."""
    if isinstance(obj, dict):
        yield path, obj
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")


if __name__ == "__main__":
    sys.exit(main())
