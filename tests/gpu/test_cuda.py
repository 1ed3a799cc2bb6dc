"""The library on CUDA: every phase and scoring in bfloat16 on a tiny decoder with every module's parameters
and inputs on the GPU (the probe tests/test_device.py runs on CPU), bf16 where it is promised (autocast
in the blocks, features rounded to and cached in bf16), gradient checkpointing, and bundles scored on CUDA
in float32 agreeing with the CPU to ~1e-4 (bfloat16 within a looser bound). Skipped without a GPU
(tests/gpu/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
from device_probe import DeviceProbe, probe_samples, run_every_phase, scored_and_cached
from tiny import TINY_LORA, build_reward_model, load_tiny, minilm_tokenizer, save_tiny, tiny_model, user

from dmoerm.bundle import load_bundle, save_bundle
from dmoerm.data.records import Turn
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.modeling.backbone import build_backbone
from dmoerm.modeling.reward_model import RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterInput
from dmoerm.modeling.top import TopStack, attach_experts, run_experts
from dmoerm.training.features import TrunkCache
from dmoerm.training.loop import FitHooks, TrainConfig
from dmoerm.training.phases import train_top

pytestmark = pytest.mark.gpu

CONTEXTS = [user("hello, how are you today?"), user("what is the boiling point of water at sea level?"),
            [Turn("system", "be brief"), Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "joke?")],
            user("hello, how are you today?"), user("can you help me with my garden? " * 6)]
RESPONSES = ["great, thanks for asking!", "100 degrees Celsius", "why did the chicken cross the road", "meh",
             "plant roses in spring and water them well " * 3]


def _cuda_backbone(kind: str = "llama", **kwargs):
    kwargs.setdefault("top_layers", 1)
    return build_backbone(tiny_model(kind), minilm_tokenizer(), max_length=64, reference=f"tiny-{kind}",
                          device="cuda", **kwargs)


def _bf16_exact(x: torch.Tensor) -> bool:
    """Every value of ``x`` is a bfloat16 number (held in float32)."""
    return x.dtype == torch.float32 and torch.equal(x, x.to(torch.bfloat16).float())


def test_every_phase_and_scoring_on_cuda_in_bfloat16():
    bb = _cuda_backbone(precision="bfloat16")
    assert bb.device.type == "cuda" and next(bb.model.parameters()).device.type == "cuda"
    with DeviceProbe("cuda") as probe:
        out = run_every_phase(bb, torch.bfloat16, probe)
    assert not probe.wrong, probe.wrong[:5]
    for kind in ("LlamaDecoderLayer", "TopStack", "RouterHead", "Aggregator"):
        assert probe.calls[kind] > 0, f"no forward of {kind} was seen: {dict(probe.calls)}"
    model = out["model"]
    modules = [model.router, out["single"].top]
    modules += [m for c in model.categories.values() for m in (c.experts, c.aggregator)]
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for m in modules for p in m.parameters())
    for feats, _, _ in out["features"].values():  # phase 3's cache: bf16, on the host
        assert feats.dtype == torch.bfloat16 and feats.device.type == "cpu"
    rewards = [s.reward for s in out["scores"]] + out["single_scores"]
    assert rewards and all(math.isfinite(r) for r in rewards)
    scored, cached = scored_and_cached(out)  # same rows; batches of other shapes may round a bf16 ulp apart
    assert scored == pytest.approx(cached, abs=3e-2, rel=3e-2)


def test_bfloat16_autocasts_the_blocks_and_rounds_what_they_hand_on():
    bb = _cuda_backbone(precision="bfloat16")
    dtypes: dict[str, torch.dtype] = {}
    bb.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda _m, _a, y: dtypes.__setitem__("trunk", y.dtype))
    enc = bb.encode(CONTEXTS, RESPONSES)
    assert enc.input_ids.device.type == "cuda" and enc.attention_mask.device.type == "cuda"
    hidden = bb.trunk(enc)  # (B, T, H)
    assert hidden.device.type == "cuda" and _bf16_exact(hidden)
    assert dtypes["trunk"] == torch.bfloat16  # the trunk's linear layers ran in bf16

    torch.manual_seed(0)
    experts = attach_experts(TopStack(bb), ["a", "b"], TINY_LORA).eval()
    experts.base_model.model.blocks[0].self_attn.q_proj.base_layer.register_forward_hook(
        lambda _m, _a, y: dtypes.__setitem__("top", y.dtype))
    out = run_experts(experts, ["a", "b"], bb, hidden, enc.attention_mask)
    assert dtypes["top"] == torch.bfloat16
    assert out.pooled.shape == (len(RESPONSES), 2, bb.hidden_size) and _bf16_exact(out.pooled)
    assert out.scores.dtype == torch.float32

    cache = TrunkCache(bb, batch_size=2, dtype=torch.bfloat16)  # rows stored in bf16 lose nothing more
    cache.add_rows(list(zip(CONTEXTS, RESPONSES)), progress=False)
    assert all(_bf16_exact(cache.rows[i].float()) for i in range(len(cache)))


def test_gradient_checkpointing_on_cuda_keeps_the_gradients_and_trains_in_bfloat16():
    grads = {}
    for ckpt in (False, True):
        bb = _cuda_backbone(top_layers=2, gradient_checkpointing=ckpt)
        torch.manual_seed(0)
        top = TopStack(bb).train()
        enc = bb.encode(CONTEXTS, RESPONSES)
        args, kwargs = bb.layer_inputs(enc.attention_mask)
        top(bb.trunk(enc), enc.attention_mask, args, kwargs)[1].sum().backward()
        grads[ckpt] = {k: p.grad for k, p in top.named_parameters()}
    for k, g in grads[False].items():  # activations recomputed or kept: the same gradients
        torch.testing.assert_close(grads[True][k], g, atol=1e-5, rtol=1e-4)

    bb = _cuda_backbone(top_layers=2, gradient_checkpointing=True, precision="bfloat16")
    samples = probe_samples()
    cache = TrunkCache(bb, batch_size=4, dtype=torch.bfloat16)
    cache.add_samples(samples, progress=False)
    settings = TrainConfig(lr=1e-3, epochs=1, batch_size=4, max_steps=2, warmup_ratio=0.0, patience=1)
    top, result = train_top(bb, cache, samples[:12], samples[12:], settings, hooks=FitHooks(progress=False))
    assert result.steps == 2 and all(torch.isfinite(p).all() and p.device.type == "cuda" for p in top.parameters())


# ---- scoring on CUDA agrees with the CPU ----------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(bundle folder, base folder) of a tiny decoder DMoERM routed from row prefixes, with a baseline."""
    base = save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)
    bb = load_tiny(base, device="cpu")
    model = build_reward_model(bb, {"chat": ["empathy", "logic"], "qa": ["correctness"]}, router_inputs=RouterInput())
    path = tmp_path_factory.mktemp("llama-bundle") / "bundle"
    torch.manual_seed(1)
    save_bundle(path, model, lora=TINY_LORA, aggregator=AggregatorConfig(), router_width=0, baseline=TopStack(bb))
    return str(path), base


def _scores(model: RewardModel, baseline: SingleRewardModel | None) -> dict[str, list[float]]:
    routed = model.score(CONTEXTS, RESPONSES)
    forced = model.score(CONTEXTS, RESPONSES, ["qa", "chat", "qa", "chat", "chat"])
    out = {"routed": [s.reward for s in routed], "forced": [s.reward for s in forced],
           "capabilities": [v for s in forced for v in s.capability_scores.values()],
           "probs": [s.category_prob for s in routed], "categories": [s.category for s in routed]}
    if baseline is not None:
        out["baseline"] = baseline.score(CONTEXTS, RESPONSES)
    return out


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_cuda_float32_scores_match_the_cpu_and_bfloat16_stays_close(which, tiny_bundle, llama_bundle):
    path, base = (tiny_bundle[0], None) if which == "bert" else llama_bundle
    cpu = load_bundle(path, base=base, device="cpu")
    gpu = load_bundle(path, base=base, device="cuda")
    bf16 = load_bundle(path, base=base, device="cuda", precision="bfloat16")
    assert cpu.model.backbone.device.type == "cpu"
    assert gpu.model.backbone.device.type == "cuda" and gpu.model.backbone.precision == "float32"
    assert bf16.model.backbone.precision == "bfloat16"
    want = _scores(cpu.model, cpu.baseline)
    got = _scores(gpu.model, gpu.baseline)
    low = _scores(bf16.model, bf16.baseline)
    assert got["categories"] == want["categories"]
    same_route = [i for i, (a, b) in enumerate(zip(low["categories"], want["categories"])) if a == b]
    low["routed"] = [low["routed"][i] for i in same_route]  # bf16 may flip a near-tie route: compare the rest
    for key in ("routed", "forced", "capabilities", "probs", "baseline"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
        expected = [want[key][i] for i in same_route] if key == "routed" else want[key]
        assert low[key] == pytest.approx(expected, abs=5e-2, rel=5e-2), key
    drift = max(abs(a - b) for a, b in zip(low["forced"], want["forced"]))
    assert drift > 0, "bfloat16 scored exactly like float32: autocast did not run"


def test_load_bundle_and_the_served_model_pick_the_gpu_by_default(tiny_bundle):
    from dmoerm.serving.service import Row, ServedModel

    path = tiny_bundle[0]
    assert load_bundle(path).model.backbone.device.type == "cuda"  # auto
    served = ServedModel.load(path)
    assert served.model.backbone.device.type == "cuda"
    assert all(p.device.type == "cuda" for c in served.model.categories.values() for p in c.experts.parameters())
    scores = served.score_rows([Row(c, r) for c, r in zip(CONTEXTS, RESPONSES)])
    assert len(scores) == len(RESPONSES) and all(math.isfinite(s.reward) for s in scores)
    on_cpu = ServedModel.load(path, device="cpu")
    assert on_cpu.model.backbone.device.type == "cpu"
    assert [s.reward for s in on_cpu.score_rows([Row(c, r) for c, r in zip(CONTEXTS, RESPONSES)])] == pytest.approx(
        [s.reward for s in scores], abs=1e-4)
