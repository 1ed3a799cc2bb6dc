"""The KubeRay manifests (cluster/kuberay/*.yaml) parse, carry the fields KubeRay's ray.io/v1 CRDs require,
and agree with the project: the RayJob runs a real job module on a config ``load_config`` accepts, the
RayService's serveConfigV2 is serve/config.yaml (the Serve config the serving tests deploy) with only the
declared cluster overrides, secrets are secretKeyRefs, Services are private, GPU groups select GPU nodes.
Every check fails on a copy broken in the way it guards against."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cluster.checks import load_yaml_docs
from cluster.kuberay_checks import manifest_problems

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
FILES = ["base.yaml", "mlflow.yaml", "raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "vllm-judge.yaml"]


def docs(name: str) -> list[dict]:
    return load_yaml_docs(KUBERAY / name)


def test_the_manifests_are_the_ones_documented():
    assert sorted(p.name for p in KUBERAY.glob("*.yaml")) == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_shipped_manifest_passes_every_check(name):
    assert manifest_problems(docs(name), name) == []


def test_images_agree_with_the_launcher():
    launcher = yaml.safe_load((REPO / "cluster" / "launcher" / "aws.yaml").read_text())
    images = {c["image"] for name in FILES for d in docs(name) for _, node in _walk(d)
              for c in node.get("containers") or []}
    assert images == {launcher["docker"]["image"]}


def _walk(obj, path=""):
    from cluster.checks import walk

    yield from walk(obj, path)


def test_rayservice_is_rendered_from_serve_config():
    from cluster import render

    text = (KUBERAY / "rayservice.yaml").read_text()
    assert render.render_manifest(text, render.render_serve_config()) == text
    assert render.main(["--check"]) == 0


def _flat(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list) and all(isinstance(x, dict) and "name" in x for x in obj):
        for x in obj:
            yield from _flat(x, f"{path}[{x['name']}]")
    else:
        yield path, obj


def test_serve_config_v2_differs_from_serve_config_yaml_only_by_the_cluster_overrides():
    from serve.app import AppArgs

    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (rayservice,) = docs("rayservice.yaml")
    cluster = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    a, b = dict(_flat(shipped)), dict(_flat(cluster))
    changed = {k for k in a.keys() | b.keys() if a.get(k, KeyError) != b.get(k, KeyError)}
    assert changed == {"proxy_location", "http_options.host", "applications[dmoerm].args.require_auth",
                       "applications[dmoerm].deployments[AdapterPool].ray_actor_options.num_cpus",
                       "applications[dmoerm].deployments[AdapterPool].ray_actor_options.num_gpus"}
    (app,) = cluster["applications"]
    AppArgs.model_validate(app["args"])  # the builder's own arguments
    assert b["applications[dmoerm].deployments[AdapterPool].ray_actor_options.num_gpus"] == 1


def test_rayjob_runs_the_pipeline_job_on_a_config_dmoerm_loads():
    import shlex

    from dmoerm.config import load_config

    (job,) = docs("rayjob.yaml")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.run_pipeline"]
    i = words.index("--config")
    cfg = load_config(REPO / words[i + 1].removeprefix("/app/"), words[i + 2:])
    assert cfg.platform.expert_resources.use_gpu and cfg.platform.storage_uri.startswith("s3://")
    assert cfg.platform.mlflow_tracking_uri == "http://mlflow.dmoerm.svc.cluster.local:5000"


# ---- every check can fail --------------------------------------------------------------------------------
def _at(doc: dict, path: str):
    node = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def _set(path: str, value):
    def edit(ds: list[dict]) -> None:
        parent, _, last = path.rpartition(".")
        node = _at(ds[0], parent) if parent else ds[0]
        if value is KeyError:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return edit


def _doc(kind: str, path: str, value):
    """Edit the first document of ``kind``."""
    def edit(ds: list[dict]) -> None:
        d = next(x for x in ds if x["kind"] == kind)
        _set(path, value)([d])
    return edit


def _append(doc: dict):
    return lambda ds: ds.append(doc)


RC = "spec"
W = "spec.workerGroupSpecs"
GPU_TRAIN = f"{W}.1"
HEAD_ENV = f"{RC}.headGroupSpec.template.spec.containers.0.env"
RJ = "spec.rayClusterSpec"
RS = "spec.rayClusterConfig"
JOB = "spec.entrypoint"
ENTRY = ("python -m jobs.run_pipeline --config /app/configs/demo.yaml platform.storage_uri=s3://b/p "
         "platform.expert_resources.use_gpu=true")

BROKEN = [
    ("raycluster.yaml", "no head", _set(f"{RC}.headGroupSpec", KeyError), "headGroupSpec: required"),
    ("raycluster.yaml", "no group name", _set(f"{W}.0.groupName", KeyError), "groupName: required"),
    ("raycluster.yaml", "duplicate group", _set(f"{W}.2.groupName", "gpu-train"), "must be unique"),
    ("raycluster.yaml", "min above max", _set(f"{W}.0.minReplicas", 9), "minReplicas <= replicas <= maxReplicas"),
    ("raycluster.yaml", "no bounds", _set(f"{W}.0.maxReplicas", KeyError), "must be integers"),
    ("raycluster.yaml", "int start param", _set(f"{RC}.headGroupSpec.rayStartParams", {"num-cpus": 0}),
     "map of strings"),
    ("raycluster.yaml", "no head container", _set(f"{RC}.headGroupSpec.template.spec.containers", []),
     "containers: required"),
    ("raycluster.yaml", "container without image", _set(f"{W}.0.template.spec.containers.0.image", KeyError),
     "every container needs a name and an image"),
    ("raycluster.yaml", "public head service", _set(f"{RC}.headGroupSpec.headService", {"spec": {"type": "NodePort"}}),
     "headService.spec.type: must be ClusterIP"),
    ("raycluster.yaml", "no name", _set("metadata.name", KeyError), "metadata.name is required"),
    ("raycluster.yaml", "GPU group anywhere", _set(f"{GPU_TRAIN}.template.spec.nodeSelector", KeyError),
     "no nodeSelector"),
    ("raycluster.yaml", "GPU taint not tolerated", _set(f"{GPU_TRAIN}.template.spec.tolerations", KeyError),
     "does not tolerate"),
    ("raycluster.yaml", "auth off", _set(f"{RC}.authOptions", KeyError), "Ray token auth is off"),
    ("raycluster.yaml", "public head", _set(f"{RC}.headGroupSpec.serviceType", "LoadBalancer"), "must stay private"),
    ("raycluster.yaml", "ingress on head", _set(f"{RC}.headGroupSpec.enableIngress", True), "must stay private"),
    ("raycluster.yaml", "literal judge key", lambda ds: _at(ds[0], HEAD_ENV).append(
        {"name": "OPENAI_API_KEY", "value": "sk-live-123"}), "a literal value for a secret"),
    ("raycluster.yaml", "secret from a plain env", lambda ds: _at(ds[0], HEAD_ENV).append(
        {"name": "HF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}), "secretKeyRef"),
    ("raycluster.yaml", "credentials in a URL", lambda ds: _at(ds[0], HEAD_ENV).append(
        {"name": "MLFLOW_TRACKING_URI", "value": "http://bob:hunter2@mlflow:5000"}), "URL with credentials"),
    ("raycluster.yaml", "auth disabled by env", lambda ds: _at(ds[0], HEAD_ENV).append(
        {"name": "RAY_AUTH_MODE", "value": "disabled"}), "must be 'token'"),
    ("raycluster.yaml", "other Ray", _set(f"{RC}.rayVersion", "2.9.0"), "is not the image's Ray"),
    ("raycluster.yaml", "old API", _set("apiVersion", "ray.io/v1alpha1"), "apiVersion must be ray.io/v1"),
    ("raycluster.yaml", "a Secret in the file", _append({"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "s"}, "stringData": {"auth_token": "x"}}), "a Secret with its values in a file"),
    ("raycluster.yaml", "an Ingress", _append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                                               "metadata": {"name": "dash"}}), "no Ingress"),
    ("rayjob.yaml", "not a job module", _set(JOB, ENTRY.replace("jobs.run_pipeline", "jobs.nope")),
     "is not a job module"),
    ("rayjob.yaml", "config not in the repo", _set(JOB, ENTRY.replace("demo.yaml", "missing.yaml")),
     "no configs/missing.yaml in the repo"),
    ("rayjob.yaml", "config outside the image", _set(JOB, ENTRY.replace("/app/configs", "configs")),
     "must be a path in the image"),
    ("rayjob.yaml", "bad override", _set(JOB, ENTRY + " platform.expert_resourcez.use_gpu=true"),
     "load_config(/app/configs/demo.yaml, overrides) fails: unknown config field(s) platform.expert_resourcez"),
    ("rayjob.yaml", "secret on the command line", _set(JOB, ENTRY + " labels.judge.api_key=sk-123"),
     "a secret-named override"),
    ("rayjob.yaml", "no config", _set(JOB, "python -m jobs.run_pipeline"), "needs --config PATH"),
    ("rayjob.yaml", "not python -m", _set(JOB, "bash run.sh"), "must be `python -m jobs.<module>"),
    ("rayjob.yaml", "interactive", _set("spec.submissionMode", "InteractiveMode"), "spec.submissionMode"),
    ("rayjob.yaml", "cluster kept", _set("spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
    ("rayjob.yaml", "no GPU group", lambda ds: _at(ds[0], f"{RJ}.workerGroupSpecs").pop(1),
     "no GPU group for the expert trainers"),
    ("rayjob.yaml", "no cluster", _set(RJ, KeyError), "rayClusterSpec: required"),
    ("rayservice.yaml", "serve config drifted", lambda ds: ds[0]["spec"].update(serveConfigV2=ds[0]["spec"][
        "serveConfigV2"].replace("max_replicas: 8", "max_replicas: 9")), "differs from serve/config.yaml"),
    ("rayservice.yaml", "not a Serve config", lambda ds: ds[0]["spec"].update(serveConfigV2="applicationz: []\n"),
     "not a valid Serve config"),
    ("rayservice.yaml", "serve config as a map", lambda ds: ds[0]["spec"].update(serveConfigV2={"applications": []}),
     "a string holding the Serve config YAML"),
    ("rayservice.yaml", "public serve service", _set("spec.serveService.spec.type", "NodePort"), "must be ClusterIP"),
    ("rayservice.yaml", "too few GPU pods", _set(f"{RS}.workerGroupSpecs.1.maxReplicas", 2),
     "the GPU groups hold 2 GPUs"),
    ("rayservice.yaml", "no cluster", _set(RS, KeyError), "rayClusterConfig: required"),
    ("rayservice.yaml", "auth off", _set(f"{RS}.authOptions", KeyError), "Ray token auth is off"),
    ("mlflow.yaml", "public MLflow", _doc("Service", "spec.type", "LoadBalancer"), "private only"),
    ("mlflow.yaml", "MLflow on an external IP", _doc("Service", "spec.externalIPs", ["203.0.113.7"]), "private only"),
    ("mlflow.yaml", "no readiness", _set("spec.template.spec.containers.0.readinessProbe", KeyError), "readinessProbe"),
    ("vllm-judge.yaml", "literal API key", _set("spec.template.spec.containers.0.env.0", {
        "name": "VLLM_API_KEY", "value": "sk-abc"}), "a literal value for a secret"),
    ("vllm-judge.yaml", "no API key", lambda ds: _at(ds[0], "spec.template.spec.containers.0.env").pop(0),
     "VLLM_API_KEY must come from a secretKeyRef"),
    ("vllm-judge.yaml", "key on the command line", lambda ds: _at(ds[0], "spec.template.spec.containers.0.args").extend(
        ["--api-key", "sk-abc"]), "--api-key takes a literal"),
    ("vllm-judge.yaml", "model not on the volume", _set("spec.template.spec.containers.0.command",
                                                        ["vllm", "serve", "/tmp/judge"]), "PersistentVolumeClaim"),
    ("vllm-judge.yaml", "not vLLM", _set("spec.template.spec.containers.0.command", ["python", "-m", "http.server"]),
     "must run `vllm serve MODEL"),
    ("vllm-judge.yaml", "no GPU", lambda ds: [_at(ds[0], f"spec.template.spec.containers.0.resources.{k}").pop(
        "nvidia.com/gpu") for k in ("limits", "requests")], "must request nvidia.com/gpu"),
    ("vllm-judge.yaml", "GPU anywhere", _set("spec.template.spec.nodeSelector", KeyError), "no nodeSelector"),
    ("vllm-judge.yaml", "two servers", lambda ds: ds.append(copy.deepcopy(ds[0])), "expected one Deployment"),
    ("vllm-judge.yaml", "no readiness", _set("spec.template.spec.containers.0.readinessProbe", KeyError),
     "the vLLM container needs a readinessProbe"),
    ("vllm-judge.yaml", "service selects nothing", _doc("Service", "spec.selector", {"app": "other"}),
     "no Service selects"),
]


@pytest.mark.parametrize("name,what,edit,message", BROKEN, ids=[f"{b[0]}:{b[1]}" for b in BROKEN])
def test_each_check_fails_on_a_broken_copy(name, what, edit, message):
    broken = copy.deepcopy(docs(name))
    edit(broken)
    problems = manifest_problems(broken, name)
    assert any(message in p for p in problems), (what, problems)
    assert all(p.startswith(name) for p in problems)
