"""The device and precision policy (``dmoerm.device``): how names resolve, what is refused and where, and
every phase and scoring run on an explicit ``device="cpu"`` with every module's parameters and inputs
there (the same probe runs on CUDA in tests/gpu/test_cuda.py). Gradient checkpointing recomputes the
trainable blocks and leaves the gradients as they were; bundles record their precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from device_probe import DeviceProbe, run_every_phase, scored_and_cached
from tiny import minilm_tokenizer, tiny_model, user

from dmoerm.bundle import load_bundle
from dmoerm.config import ModelConfig, load_config
from dmoerm.device import (
    autocast,
    check_precision,
    feature_dtype,
    resolve_device,
    round_features,
    to_device,
)
from dmoerm.modeling.backbone import Encoded, build_backbone
from dmoerm.modeling.top import TopStack

NO_CUDA = not torch.cuda.is_available()
BASE = {"taxonomy": [{"name": "a", "capabilities": ["x"]}], "data": {"sources": []},
        "labels": {"source": "attributes", "attributes_path": "unused.jsonl"}}


def _backbone(kind: str = "llama", **kwargs):
    kwargs.setdefault("top_layers", 1)
    return build_backbone(tiny_model(kind), minilm_tokenizer(), max_length=64, reference=f"tiny-{kind}", **kwargs)


# ---- the policy --------------------------------------------------------------------------------------
def test_device_names_resolve_as_documented():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "CUDA", "", "meta"):
        with pytest.raises(ValueError, match="model.device must be auto, cpu, cuda or cuda:<index>"):
            resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_up_front():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        _backbone(device="cuda:0")


def test_bfloat16_is_refused_off_cuda_with_the_fields_named():
    with pytest.raises(ValueError, match="model.precision=bfloat16 needs a CUDA device"):
        check_precision(torch.device("cpu"), "bfloat16")
    with pytest.raises(ValueError, match="model.precision must be one of"):
        check_precision(torch.device("cpu"), "float16")
    with pytest.raises(ValueError, match="bfloat16 needs CUDA .* model.device is cpu"):
        load_config(data={**BASE, "model": {"device": "cpu", "precision": "bfloat16"}})
    with pytest.raises(ValueError, match="model.device must be"):
        load_config(data={**BASE, "model": {"device": "gpu"}})
    with pytest.raises(ValueError, match="bfloat16 needs a CUDA device"):
        _backbone(device="cpu", precision="bfloat16")
    with pytest.raises(ValueError, match="bfloat16 needs a CUDA device"), autocast("cpu", "bfloat16"):
        pass


def test_config_defaults_and_bfloat16_on_auto():
    m = ModelConfig()
    assert (m.device, m.precision, m.gradient_checkpointing) == ("auto", "float32", False)
    cfg = load_config(data={**BASE, "model": {"precision": "bfloat16", "device": "cuda:1",
                                                            "gradient_checkpointing": True}})
    assert (cfg.model.device, cfg.model.precision, cfg.model.gradient_checkpointing) == ("cuda:1", "bfloat16", True)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_bfloat16_on_auto_without_a_gpu_fails_where_the_base_loads(tiny_bert_dir):
    from dmoerm.stages.base import backbone_for

    cfg = load_config(data={**BASE, "model": {"base": tiny_bert_dir, "precision": "bfloat16"}})
    with pytest.raises(ValueError, match=r"bfloat16 needs a CUDA device .*, but the device is 'cpu'"):
        backbone_for(cfg)


def test_rounding_and_moving():
    x = torch.tensor([1.0 + 2**-10, 3.0])
    assert round_features(x, "float32") is x  # float32: untouched, no copy
    r = round_features(x, "bfloat16")
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 3.0]  # bf16 keeps 8 mantissa bits
    assert feature_dtype("bfloat16") == torch.bfloat16 and feature_dtype("float32") == torch.float32
    with autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    t = torch.ones(2)
    enc = Encoded(t, t, t, t, t)
    moved = to_device({"a": (enc, [t]), "n": 3}, "cpu")
    assert isinstance(moved["a"][0], Encoded) and moved["n"] == 3 and isinstance(moved["a"][1], list)


# ---- every phase and scoring on device="cpu", explicitly ------------------------------------------------
def test_every_phase_and_scoring_run_on_the_backbone_device(torch_single_thread):
    bb = _backbone("llama", device="cpu", precision="float32")
    assert bb.device == torch.device("cpu")
    with DeviceProbe("cpu") as probe:
        out = run_every_phase(bb, torch.float32, probe)
    assert not probe.wrong, probe.wrong[:5]
    for kind in ("LlamaDecoderLayer", "TopStack", "RouterHead", "Aggregator", "Linear"):
        assert probe.calls[kind] > 0, f"no forward of {kind} was seen: {dict(probe.calls)}"
    model = out["model"]
    modules = [model.router, out["single"].top]
    modules += [m for c in model.categories.values() for m in (c.experts, c.aggregator)]
    assert all(p.device == bb.device for m in modules for p in m.parameters())
    for feats, _, _ in out["features"].values():
        assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert len(out["scores"]) == len(out["single_scores"]) == sum(len(s.responses) for s in out["val"])
    both_dmoerm, both_single = out["both"]
    assert [s.reward for per in both_dmoerm for s in per] == pytest.approx([s.reward for s in out["scores"]], abs=1e-5)
    assert [r for per in both_single for r in per] == pytest.approx(out["single_scores"], abs=1e-5)
    names, probs, full = out["routes"]
    assert set(names) <= {"chat", "qa"} and full.shape == (len(out["val"]), 2) and full.device.type == "cpu"
    scored, cached = scored_and_cached(out)  # a reward at scoring time is its aggregator on the cached states
    assert scored == pytest.approx(cached, abs=1e-5)


# ---- gradient checkpointing ------------------------------------------------------------------------------
def test_gradient_checkpointing_recomputes_the_top_blocks_with_the_same_gradients(torch_single_thread):
    grads, calls = {}, {}
    for ckpt in (False, True):
        bb = _backbone("llama", top_layers=2, gradient_checkpointing=ckpt)
        torch.manual_seed(0)
        top = TopStack(bb).train()
        assert top.gradient_checkpointing is ckpt
        n = {"forwards": 0}

        def count(*_, n=n) -> None:
            n["forwards"] += 1

        top.blocks[0].register_forward_pre_hook(count)
        enc = bb.encode([user("hello there"), user("a longer question about my garden")], ["hi", "plant roses"])
        hidden = bb.trunk(enc)
        args, kwargs = bb.layer_inputs(enc.attention_mask)
        _, scores = top(hidden, enc.attention_mask, args, kwargs)
        scores.sum().backward()
        grads[ckpt] = {k: p.grad.clone() for k, p in top.named_parameters()}
        calls[ckpt] = n["forwards"]
        with torch.no_grad():  # no recomputation outside training
            top(hidden, enc.attention_mask, args, kwargs)
        calls[ckpt, "no_grad"] = n["forwards"] - calls[ckpt]
    assert calls[False] == 1 and calls[True] == 2  # the checkpointed block ran again in the backward pass
    assert calls[False, "no_grad"] == calls[True, "no_grad"] == 1
    assert grads[False].keys() == grads[True].keys()
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], atol=1e-6, rtol=1e-5)


# ---- bundles ------------------------------------------------------------------------------------------
def test_bundles_record_their_precision_and_a_bfloat16_one_is_refused_on_cpu(tiny_bundle, tmp_path):
    path, model, _ = tiny_bundle
    meta = json.loads((Path(path) / "bundle.json").read_text())
    assert meta["base"]["precision"] == "float32"
    loaded = load_bundle(path, device="cpu")
    assert loaded.model.backbone.device == torch.device("cpu") and loaded.model.backbone.precision == "float32"
    assert all(p.device.type == "cpu" for p in loaded.model.router.parameters())

    bf16 = tmp_path / "bf16"
    shutil.copytree(path, bf16)
    meta["base"]["precision"] = "bfloat16"
    (bf16 / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"trained in bfloat16 \(base.precision\).*device='cuda'.*precision='float32'"):
        load_bundle(bf16, device="cpu")
    as_fp32 = load_bundle(bf16, device="cpu", precision="float32")
    contexts, responses = [user("hi"), user("tell me about cats")], ["hello", "they purr"]
    assert [s.reward for s in as_fp32.model.score(contexts, responses)] == pytest.approx(
        [s.reward for s in loaded.model.score(contexts, responses)], abs=1e-6)
