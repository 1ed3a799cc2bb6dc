"""The bundle as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)``
and ``mlflow models serve`` score with it.

Input: a DataFrame with ``context`` (a list of ``{"role", "content"}`` turns, or a plain string taken as
one user turn) and ``response`` columns; optional ``category`` forces a category. Output: a DataFrame with
``reward``, ``category``, ``category_prob`` and ``capability_scores`` (a JSON object per row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc


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


def log_bundle_model(bundle_dir: str | Path, name: str = "model", input_example=None):
    """Log the bundle as a pyfunc model of the active run; returns mlflow's ``ModelInfo``."""
    import dmoerm

    package = Path(dmoerm.__file__).resolve().parent
    # Models from code: MLflow stores this file's source, not a pickled object.
    return mlflow.pyfunc.log_model(name=name, python_model=str(package / "mlflow_entry.py"),
                                   artifacts={"bundle": str(bundle_dir)},
                                   code_paths=[str(package)], input_example=input_example,
                                   pip_requirements=_requirements())


def _requirements() -> list[str]:
    from importlib.metadata import version

    reqs = []
    for dist in ("torch", "transformers", "peft", "safetensors", "pyyaml", "tqdm", "pandas"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except Exception:
            reqs.append(dist)
    return reqs
