"""Candidate generation (dmoerm.generation) on a tiny random Llama-shaped causal LM: N candidates per prompt
in one ``generate`` call per batch, seeded per prompt (batch-mates, batch size and left padding change
nothing), the chat template, the backend choice, and the vLLM adapter's mapping onto vLLM's offline API
(against a stand-in ``vllm`` module: vLLM itself cannot be installed here)."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_causal import save_tiny_causal

from dmoerm.data.records import DataError, Turn
from dmoerm.generation import (
    GenerationConfig,
    TransformersGenerator,
    _SeededSampler,
    build_generator,
    encode_prompts,
    generate_candidates,
    plan_batches,
    prompt_seed,
    read_prompts,
    resolve_backend,
    write_candidates,
)

PROMPTS = ["hi",
           [Turn("user", "how do I bake a cake for the birthday party of my best friend tonight at home")],
           "tell me about the garden",
           [Turn("system", "be brief"), Turn("user", "my bike"), Turn("assistant", "yes?"), Turn("user", "fix it")],
           "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return save_tiny_causal(tmp_path_factory.mktemp("policy"))


def cfg_for(policy: str, **kw) -> GenerationConfig:
    kw = {"num_candidates": 3, "max_new_tokens": 6, "batch_size": 2, "temperature": 1.0, "backend": "transformers",
          **kw}
    return GenerationConfig(model=policy, **kw)


def count_generate_calls(gen: TransformersGenerator) -> list[tuple[int, int]]:
    """Wrap the model's ``generate``: records each call's input shape (rows, width)."""
    calls: list[tuple[int, int]] = []
    inner = gen.model.generate

    def counted(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return inner(*args, **kwargs)

    gen.model.generate = counted
    return calls


def test_n_candidates_per_prompt_in_one_generate_call_per_batch(policy, torch_single_thread):
    cfg = cfg_for(policy)
    gen = build_generator(cfg)
    calls = count_generate_calls(gen)
    out = generate_candidates(PROMPTS, cfg, generator=gen, progress=False)
    assert [len(c) for c in out] == [3] * 5
    assert all(isinstance(t, str) and t for c in out for t in c)
    assert all(len(set(c)) == 3 for c in out), "sampled candidates of a prompt should differ"
    assert [rows for rows, _ in calls] == [6, 6, 3], "one generate call per batch of 2 prompts x 3 candidates"
    lengths = [len(x) for x in encode_prompts(PROMPTS, gen.tokenizer)]
    widths = [w for _, w in calls]
    assert widths[0] == max(lengths) and widths == sorted(widths, reverse=True), "longest prompts first"


def test_plan_batches_groups_similar_lengths():
    assert plan_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert plan_batches([], 4) == []


def test_deterministic_under_a_seed(policy, torch_single_thread):
    a = generate_candidates(PROMPTS, cfg_for(policy, seed=11), progress=False)
    b = generate_candidates(PROMPTS, cfg_for(policy, seed=11), progress=False)
    c = generate_candidates(PROMPTS, cfg_for(policy, seed=12), progress=False)
    assert a == b
    assert a != c


def test_sampled_candidates_do_not_depend_on_batch_mates_or_batch_size(policy, torch_single_thread):
    gen = build_generator(cfg_for(policy, batch_size=5))
    together = generate_candidates(PROMPTS, gen.cfg, generator=gen, progress=False)
    alone = [generate_candidates([p], gen.cfg, generator=gen, progress=False)[0] for p in PROMPTS]
    assert together == alone


def test_left_padding_greedy_candidates_are_the_same_batched_or_alone(policy, torch_single_thread):
    cfg = cfg_for(policy, temperature=0.0, batch_size=5, max_new_tokens=8)
    gen = build_generator(cfg)
    calls = count_generate_calls(gen)
    together = generate_candidates(PROMPTS, cfg, generator=gen, progress=False)
    assert calls == [(5, calls[0][1])], "greedy: one row per prompt, all five in one call"
    alone = [generate_candidates([p], cfg, generator=gen, progress=False)[0] for p in PROMPTS]
    assert together == alone
    assert all(len(set(c)) == 1 and len(c) == 3 for c in together), "greedy: N identical candidates"
    assert len({c[0] for c in together}) == 5


def test_a_tiny_nucleus_is_greedy(policy, torch_single_thread):
    greedy = generate_candidates(PROMPTS, cfg_for(policy, temperature=0.0), progress=False)
    nucleus = generate_candidates(PROMPTS, cfg_for(policy, temperature=1.0, top_p=1e-6), progress=False)
    assert nucleus == greedy


def test_seeded_sampler_draws_from_the_nucleus_with_the_right_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    scores = probs.log().expand(rows, 4).clone()  # (R, V)
    for top_p, expect in ((1.0, probs), (0.7, torch.tensor([0.625, 0.375, 0.0, 0.0]))):
        sampler = _SeededSampler(list(range(rows)), temperature=1.0, top_p=top_p)
        out = sampler(torch.zeros(rows, 1, dtype=torch.long), scores)
        assert torch.isfinite(out).sum(-1).eq(1).all(), "exactly one finite score per row"
        freq = torch.bincount(out.argmax(-1), minlength=4).float() / rows
        assert torch.allclose(freq, expect, atol=0.03), (top_p, freq)
    sharp = _SeededSampler(list(range(rows)), temperature=0.25, top_p=1.0)(torch.zeros(rows, 1), scores)
    assert (sharp.argmax(-1) == 0).float().mean() > 0.85  # p^4 renormalised: 0.5^4 / sum = 0.87


def test_conversations_use_the_chat_template(policy):
    gen_tok = build_generator(cfg_for(policy)).tokenizer
    [ids] = encode_prompts([[Turn("user", "hello there")]], gen_tok)
    assert gen_tok.decode(ids) == "user : hello there assistant :"
    gen_tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*GenerationConfig.chat_template"):
        encode_prompts(["fine", [Turn("user", "hello")]], gen_tok)


def test_auto_falls_back_to_transformers_without_vllm(policy):
    assert importlib.util.find_spec("vllm") is None, "this test needs an environment without vllm"
    cfg = cfg_for(policy, backend="auto")
    assert resolve_backend(cfg) == "transformers"
    assert isinstance(build_generator(cfg), TransformersGenerator)


def test_asking_for_vllm_without_it_says_to_install_the_gpu_extra(policy):
    assert importlib.util.find_spec("vllm") is None
    with pytest.raises(ImportError, match="install the gpu extra"):
        build_generator(cfg_for(policy, backend="vllm"))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_candidates"):
        GenerationConfig(model="m", num_candidates=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(model="m", top_p=0)
    with pytest.raises(ValueError, match="backend"):
        GenerationConfig(model="m", backend="sglang")


def test_prompt_and_candidate_files_round_trip(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n" + json.dumps(
        {"context": [{"role": "user", "content": "yo"}], "responses": ["x", "y"], "ranks": [1, 2]}) + "\n")
    ids, prompts = read_prompts(str(src))
    assert ids == ["a", "2"] and prompts == ["hi", [Turn("user", "yo")]]
    cfg = GenerationConfig(model="m", num_candidates=2)
    write_candidates(tmp_path / "out.jsonl", ids, prompts, [["1", "2"], ["3", "4"]], cfg)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[1]["context"] == [{"role": "user", "content": "yo"}] and rows[1]["candidates"] == ["3", "4"]
    assert rows[0]["generation"]["num_candidates"] == 2
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"context": [{"role": "robot"}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: .*\(field 'context'\)"):
        read_prompts(str(src))


# ---------------------------------------------------------------------------------- the vLLM adapter

FAKE_VLLM = '''
"""A stand-in for vLLM's offline API (vLLM cannot be installed here): records what it is given and
answers in the shape of vLLM's RequestOutput / CompletionOutput. It tests our mapping, never vLLM."""
from dataclasses import dataclass, field

calls = []


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class RequestOutput:
    request_id: str
    prompt: object
    prompt_token_ids: list
    outputs: list
    finished: bool = True


class LLM:
    def __init__(self, model, **kwargs):
        calls.append(("LLM", {"model": model, **kwargs}))

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        calls.append(("generate", {"prompts": prompts, "sampling_params": sampling_params, "use_tqdm": use_tqdm}))
        out = []
        for k, (p, sp) in enumerate(zip(prompts, sampling_params)):
            n = sp.kwargs["n"]  # answered last index first: the adapter must order by .index
            outs = [CompletionOutput(i, f"p{k}-c{i}") for i in reversed(range(n))]
            out.append(RequestOutput(str(k), None, p["prompt_token_ids"], outs))
        return out
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    folder = tmp_path / "fake_site"
    (folder / "vllm").mkdir(parents=True)
    (folder / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    importlib.invalidate_caches()
    import vllm

    assert Path(vllm.__file__).parent.parent == folder
    yield vllm
    sys.modules.pop("vllm", None)


def test_vllm_adapter_maps_the_config_onto_vllms_offline_api(policy, fake_vllm):
    cfg = cfg_for(policy, backend="vllm", num_candidates=4, temperature=0.8, top_p=0.9, max_new_tokens=32, seed=7,
                  dtype="bfloat16", vllm_engine_kwargs={"tensor_parallel_size": 1, "gpu_memory_utilization": 0.8})
    gen = build_generator(cfg)
    assert gen.backend == "vllm" and gen.prompts_per_call is None
    out = generate_candidates(PROMPTS, cfg, generator=gen, progress=False)
    (kind, init), (kind2, call) = fake_vllm.calls
    assert (kind, kind2) == ("LLM", "generate"), "one engine, one generate call for every prompt"
    assert init == {"model": policy, "dtype": "bfloat16", "seed": 7, "tensor_parallel_size": 1,
                    "gpu_memory_utilization": 0.8}
    ids = encode_prompts(PROMPTS, gen.tokenizer)  # what the transformers backend feeds its model
    sent = [p["prompt_token_ids"] for p in call["prompts"]]
    assert sorted(sent) == sorted(ids), "the same token ids as transformers, chat template included"
    assert call["use_tqdm"] is False
    for p, sp in zip(sent, call["sampling_params"]):
        assert sp.kwargs == {"n": 4, "temperature": 0.8, "top_p": 0.9, "max_tokens": 32, "seed": prompt_seed(7, p)}
    for k, cands in enumerate(out):
        j = sent.index(ids[k])  # sent longest first; results come back in prompt order, ordered by index
        assert cands == [f"p{j}-c{i}" for i in range(4)]


def test_vllm_greedy_asks_once_and_repeats(policy, fake_vllm):
    cfg = cfg_for(policy, backend="vllm", num_candidates=3, temperature=0.0)
    out = generate_candidates(["hi"], cfg, progress=False)
    assert fake_vllm.calls[1][1]["sampling_params"][0].kwargs["n"] == 1
    assert out == [["p0-c0"] * 3]


def test_auto_picks_vllm_only_with_cuda(policy, fake_vllm, monkeypatch):
    cfg = cfg_for(policy, backend="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend(cfg) == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(cfg) == "vllm"
