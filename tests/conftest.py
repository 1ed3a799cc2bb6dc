"""Shared fixtures. Tests need no GPU and no download: tiny models from configs, the MiniLM wheel, and
real local services started by the fixtures themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, present on developer machines and in CI but not on a user's fresh machine."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (only present beside a developer checkout)")
    return SHARED_DATA


# ---- tiny models and bundles for the modeling, training, bundle and CLI tests -------------------------
from fixtures_s3 import s3_server  # noqa: E402,F401  (tests/ is on sys.path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved 3-layer hidden-32 random BERT + the MiniLM tokenizer: a ``model.base`` path."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: str):
    """(bundle folder, the RewardModel saved there, its baseline): two categories, 2 + 1 experts with
    perturbed adapters and heads, and a single-RM baseline."""
    from tiny import TINY_LORA, build_reward_model, load_tiny

    from dmoerm.bundle import save_bundle
    from dmoerm.modeling.aggregator import AggregatorConfig
    from dmoerm.modeling.reward_model import SingleRewardModel
    from dmoerm.modeling.top import TopStack

    backbone = load_tiny(tiny_bert_dir)
    model = build_reward_model(backbone, {"chat": ["empathy", "logic"], "qa": ["correctness"]})
    baseline = TopStack(backbone)
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    save_bundle(path, model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0, baseline=baseline,
                metrics={"overall": 0.5})
    return str(path), model, SingleRewardModel(backbone, baseline)


@pytest.fixture
def torch_single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's
    oversubscription makes them 10x slower: run such tests on one thread, then restore the setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
