"""The KubeRay manifests' checks (see cluster/checks.py): the fields KubeRay's ray.io/v1 CRDs require, and
this project's rules: private Services only, Ray token auth, secrets only as ``secretKeyRef``, GPU groups
with node selection, the RayJob's entrypoint a real job with a config ``load_config`` accepts, the
RayService's Serve config the one rendered from serve/config.yaml, the vLLM judge wired to its Secret and
model volume. Each function returns problems naming the file and field."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from cluster.checks import GPU, REPO, SECRET_NAME, walk

IMAGE_ROOT = "/app"
"""Where the image (cluster/image/Dockerfile) puts the repository."""
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


def _containers(pod_template: dict) -> list[dict]:
    spec = (pod_template or {}).get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def _requests_gpu(pod_template: dict) -> int:
    return sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0)) for c in _containers(pod_template))


def env_problems(doc: dict, where: str) -> list[str]:
    """Secret-named env vars must come from a Secret (``valueFrom.secretKeyRef``), never a literal ``value``;
    RAY_AUTH_MODE, where set, must be ``token``. Also: no Secret object with data in a manifest file, no
    literal secret in a container's command line."""
    problems = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"{where}: a Secret with its values in a file; create it from the environment instead")
    for path, node in walk(doc):
        for i, var in enumerate(node.get("env") or [] if isinstance(node.get("env"), list) else []):
            name, at = var.get("name", ""), f"{where}: {path}.env[{i}] {var.get('name')}"
            if name == "RAY_AUTH_MODE" and var.get("value") != "token":
                problems.append(f"{at}: must be 'token', got {var.get('value')!r}")
            elif SECRET_NAME.search(name) and "value" in var:
                problems.append(f"{at}: a literal value for a secret; use valueFrom.secretKeyRef")
            elif SECRET_NAME.search(name) and not (var.get("valueFrom") or {}).get("secretKeyRef"):
                problems.append(f"{at}: must come from valueFrom.secretKeyRef")
            elif re.search(r"://[^/@\s:]+:[^/@\s]+@", str(var.get("value", ""))):
                problems.append(f"{at}: a URL with credentials in a literal value; use valueFrom.secretKeyRef")
        words = [str(w) for w in (node.get("command") or []) + (node.get("args") or [])] \
            if isinstance(node.get("command", []), list) and isinstance(node.get("args", []), list) else []
        for j, w in enumerate(words):
            if re.fullmatch(r"--[\w-]*(key|token|password|secret)[\w-]*", w, re.I) and j + 1 < len(words) \
                    and not words[j + 1].startswith("$("):
                problems.append(f"{where}: {path} command line: {w} takes a literal; pass it through the environment")
    return problems


def _pod_gpu_problems(template: dict, where: str) -> list[str]:
    spec = (template or {}).get("spec") or {}
    if not _requests_gpu(template):
        return []
    problems = []
    if not spec.get("nodeSelector") and not (spec.get("affinity") or {}).get("nodeAffinity"):
        problems.append(f"{where}: requests {GPU} but has no nodeSelector / nodeAffinity for GPU nodes")
    if not any(t.get("key") == GPU for t in spec.get("tolerations") or []):
        problems.append(f"{where}: requests {GPU} but does not tolerate the {GPU} taint of GPU nodes")
    return problems


def cluster_spec_problems(spec: dict, where: str, ray_version: str | None = None) -> list[str]:
    """A RayClusterSpec (a RayCluster's spec, a RayJob's rayClusterSpec, a RayService's rayClusterConfig)."""
    problems = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}.headGroupSpec: required by KubeRay"]
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{i}]", g) for i, g in
                                          enumerate(spec.get("workerGroupSpecs") or [])]
    for at, g in groups:
        conts = _containers(g.get("template"))
        if not conts:
            problems.append(f"{where}.{at}.template.spec.containers: required (the Ray container first)")
        for c in conts:
            if not c.get("image") or not c.get("name"):
                problems.append(f"{where}.{at}: every container needs a name and an image")
        params = g.get("rayStartParams", {})
        if not isinstance(params, dict) or any(not isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.{at}.rayStartParams: a map of strings (KubeRay's map[string]string): {params!r}")
        problems += _pod_gpu_problems(g.get("template"), f"{where}.{at}")
    names = [g.get("groupName") for _, g in groups[1:]]
    for at, g in groups[1:]:
        if not g.get("groupName"):
            problems.append(f"{where}.{at}.groupName: required by KubeRay")
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", g.get("minReplicas"))
        if not isinstance(lo, int) or not isinstance(hi, int):
            problems.append(f"{where}.{at}: minReplicas and maxReplicas (the autoscaling bounds) must be integers")
        elif not 0 <= lo <= (n if isinstance(n, int) else lo) <= hi or hi < 1:
            problems.append(f"{where}.{at}: needs 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1; "
                            f"got {lo} <= {n} <= {hi}")
    if len(set(names)) != len(names):
        problems.append(f"{where}.workerGroupSpecs: groupName must be unique, got {names}")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec: the head (dashboard, job API) must stay private: serviceType "
                        f"ClusterIP, no enableIngress; got {head.get('serviceType')!r}, {head.get('enableIngress')!r}")
    if ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}.headGroupSpec.headService.spec.type: must be ClusterIP")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        for at, g in groups:
            for c in _containers(g.get("template"))[:1]:
                env = {v.get("name"): v for v in c.get("env") or []}
                if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token" or not (
                        (env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef"):
                    problems.append(f"{where}.{at}: Ray token auth is off: set authOptions.mode: token (KubeRay >= "
                                    f"1.5.1) or RAY_AUTH_MODE=token with RAY_AUTH_TOKEN from a secretKeyRef")
    if ray_version and spec.get("rayVersion") != ray_version:
        problems.append(f"{where}.rayVersion: {spec.get('rayVersion')!r} is not the image's Ray ({ray_version})")
    return problems


def ray_pin() -> str | None:
    """The Ray release constraints.txt pins (what the image installs)."""
    m = re.search(r"^ray==([\w.]+)$", (REPO / "constraints.txt").read_text(), re.M)
    return m.group(1) if m else None


def entrypoint_problems(entrypoint: str, where: str) -> list[str]:
    """``python -m jobs.<module> --config /app/<config> [dotted.key=value ...]``: the module exists in the repo,
    has a ``main``, and dmoerm's ``load_config`` accepts the config with those overrides."""
    from dmoerm.config import load_config

    words = shlex.split(entrypoint or "")
    if words[:2] not in (["python", "-m"], ["python3", "-m"]) or len(words) < 3:
        return [f"{where}.entrypoint: must be `python -m jobs.<module> --config ...`, got {entrypoint!r}"]
    module, rest = words[2], words[3:]
    path = REPO / (module.replace(".", "/") + ".py")
    if not module.startswith("jobs.") or not path.exists() or "def main(" not in path.read_text():
        return [f"{where}.entrypoint: {module} is not a job module of this repo (no {module} file with a main)"]
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        return [f"{where}.entrypoint: {module} needs --config PATH"]
    i = rest.index("--config")
    config, overrides = rest[i + 1], rest[:i] + rest[i + 2:]
    if not config.startswith(IMAGE_ROOT + "/"):
        return [f"{where}.entrypoint: --config {config} must be a path in the image ({IMAGE_ROOT}/...)"]
    local = REPO / config[len(IMAGE_ROOT) + 1:]
    if not local.exists():
        return [f"{where}.entrypoint: --config {config}: no {local.relative_to(REPO)} in the repo"]
    problems = [f"{where}.entrypoint: {w}: a secret-named override; the config holds only env var NAMES"
                for w in overrides if "=" in w and SECRET_NAME.search(w.split("=")[0].rsplit(".", 1)[-1])
                and not w.split("=")[0].endswith("_env")]
    try:
        load_config(local, [w for w in overrides if not w.startswith("-")])
    except (ValueError, FileNotFoundError) as e:
        problems.append(f"{where}.entrypoint: load_config({config}, overrides) fails: {e}")
    return problems


def rayjob_problems(doc: dict, where: str) -> list[str]:
    spec = doc.get("spec") or {}
    problems = []
    if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode"):
        problems.append(f"{where}.spec.submissionMode: K8sJobMode or HTTPMode (KubeRay submits the job), "
                        f"got {spec.get('submissionMode')!r}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}.spec.shutdownAfterJobFinishes: must be true (the job's GPUs go back when it ends)")
    if not isinstance(spec.get("rayClusterSpec"), dict):
        problems.append(f"{where}.spec.rayClusterSpec: required (the cluster this job runs on)")
    else:
        problems += cluster_spec_problems(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec", ray_pin())
        if not any(_requests_gpu(g.get("template")) for g in spec["rayClusterSpec"].get("workerGroupSpecs") or []):
            problems.append(f"{where}.spec.rayClusterSpec.workerGroupSpecs: no GPU group for the expert trainers")
    return problems + entrypoint_problems(spec.get("entrypoint", ""), f"{where}.spec")


def rayservice_problems(doc: dict, where: str, expected: dict | None = None) -> list[str]:
    """``serveConfigV2`` (a string of Serve config YAML) must be valid for Ray Serve and equal ``expected``
    (default: serve/config.yaml rendered by cluster.render); the GPU groups must hold the GPU deployments."""
    from ray.serve.schema import ServeDeploySchema

    from cluster.render import render_serve_config

    spec = doc.get("spec") or {}
    problems = []
    text = spec.get("serveConfigV2")
    if not isinstance(text, str):
        return [f"{where}.spec.serveConfigV2: required, a string holding the Serve config YAML"]
    cfg = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(cfg)
    except Exception as e:  # pydantic's ValidationError names the field
        problems.append(f"{where}.spec.serveConfigV2: not a valid Serve config: {e}")
    expected = render_serve_config() if expected is None else expected
    if cfg != expected:
        problems.append(f"{where}.spec.serveConfigV2: differs from serve/config.yaml with cluster.render's "
                        f"overrides; run `python -m cluster.render`")
    svc = ((spec.get("serveService") or {}).get("spec") or {}).get("type", "ClusterIP")
    if svc != "ClusterIP":
        problems.append(f"{where}.spec.serveService.spec.type: must be ClusterIP, got {svc!r}")
    cluster = spec.get("rayClusterConfig")
    if not isinstance(cluster, dict):
        return problems + [f"{where}.spec.rayClusterConfig: required"]
    problems += cluster_spec_problems(cluster, f"{where}.spec.rayClusterConfig", ray_pin())
    need = sum((d.get("ray_actor_options") or {}).get("num_gpus", 0) * (d.get("autoscaling_config") or {}).get(
        "max_replicas", d.get("num_replicas", 1)) for a in (cfg or {}).get("applications", []) for d in a.get(
        "deployments", []))
    have = sum(_requests_gpu(g.get("template")) * g.get("maxReplicas", 0) for g in cluster.get("workerGroupSpecs") or []
               if isinstance(g.get("maxReplicas"), int))
    if have < need:
        problems.append(f"{where}.spec.rayClusterConfig.workerGroupSpecs: the GPU groups hold {have} GPUs at "
                        f"maxReplicas, the Serve config's GPU deployments need {need} at max_replicas")
    return problems


def judge_problems(docs: list[dict], where: str) -> list[str]:
    """The vLLM judge: ``vllm serve`` on a GPU, its API key from a Secret, its model on a mounted volume
    (a PVC), a readiness probe, a ClusterIP Service selecting it."""
    deps = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deps) != 1:
        return [f"{where}: expected one Deployment (the vLLM server), found {len(deps)}"]
    dep, problems = deps[0], []
    pod = (dep.get("spec") or {}).get("template") or {}
    (c, *_) = _containers(pod) or [{}]
    words = [str(w) for w in (c.get("command") or []) + (c.get("args") or [])]
    if words[:2] != ["vllm", "serve"] or len(words) < 3:
        return [f"{where}: the container must run `vllm serve MODEL ...`, got {words[:3]}"]
    env = {v.get("name"): v for v in c.get("env") or []}
    if not ((env.get("VLLM_API_KEY") or {}).get("valueFrom") or {}).get("secretKeyRef"):
        problems.append(f"{where}: VLLM_API_KEY must come from a secretKeyRef (the server requires the key)")
    claims = {v["name"] for v in (pod.get("spec") or {}).get("volumes") or [] if v.get("persistentVolumeClaim")}
    mounts = [m["mountPath"] for m in c.get("volumeMounts") or [] if m.get("name") in claims]
    if not any(words[2].startswith(m.rstrip("/") + "/") for m in mounts):
        problems.append(f"{where}: the model {words[2]} must be on a mounted PersistentVolumeClaim ({mounts})")
    if not int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0)):
        problems.append(f"{where}: the vLLM container must request {GPU}")
    if not c.get("readinessProbe"):
        problems.append(f"{where}: the vLLM container needs a readinessProbe (GET /health)")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if not any(d.get("kind") == "Service" and (d.get("spec") or {}).get("selector") and
               (d["spec"]["selector"].items() <= labels.items()) for d in docs):
        problems.append(f"{where}: no Service selects the judge's pods {labels}")
    return problems + _pod_gpu_problems(pod, f"{where}: Deployment {dep.get('metadata', {}).get('name')}")


def manifest_problems(docs: list[dict], where: str) -> list[str]:
    """Every document of one manifest file."""
    problems = []
    for n, doc in enumerate(docs):
        kind, at = doc.get("kind"), f"{where}[{n}] {doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"
        if not (doc.get("metadata") or {}).get("name"):
            problems.append(f"{at}: metadata.name is required")
        problems += env_problems(doc, at)
        if kind in RAY_KINDS and doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{at}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
        if kind == "RayCluster":
            problems += cluster_spec_problems(doc.get("spec") or {}, f"{at}.spec", ray_pin())
        elif kind == "RayJob":
            problems += rayjob_problems(doc, at)
        elif kind == "RayService":
            problems += rayservice_problems(doc, at)
        elif kind == "Service":
            spec = doc.get("spec") or {}
            if spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("externalIPs"):
                problems.append(f"{at}: private only: type ClusterIP, no externalIPs; got {spec.get('type')!r}")
        elif kind == "Ingress":
            problems.append(f"{at}: no Ingress: the dashboard, MLflow and the APIs stay on private addresses")
        elif kind == "Deployment":
            pod = (doc.get("spec") or {}).get("template") or {}
            problems += _pod_gpu_problems(pod, at)
            problems += [f"{at}: container {c.get('name')} needs a readinessProbe" for c in _containers(pod)
                         if not c.get("readinessProbe")]
    if Path(where).name == "vllm-judge.yaml":
        problems += judge_problems(docs, where)
    return problems
