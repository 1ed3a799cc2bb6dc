"""Scorer cost on MiniLM and real hh-rlhf rows.

(a) Throughput of ``RewardModel.score`` (router over 2 categories, K experts each, batch 32: trunk once per
    row, the K experts in one mixed-adapter forward) against the released research code's way: one full
    peft-wrapped model per category (LoRA on the same top layers, ``layers_to_transform``), and for each
    row and each expert ``set_adapter`` + a full forward at batch size 1, then the aggregator. Both carry
    identical weights, so their rewards are checked to agree. The released way is not charged for routing
    (it is handed our router's choice). Target: speedup >= 20x.
(b) Cost of scoring with K experts / cost of the single RM (``SingleRewardModel``: trunk + one TopStack,
    same batching) on the same rows, K = 3..6, one category, with the router (``RewardModel.route``,
    timed on its own and added) and without it (route replaced by the constant category). "The router"
    is the one ``configs/demo.yaml`` configures (``router.layers``, ``router.max_context_tokens``); the
    old full-trunk router (whole trunk over the whole context) is timed beside it. Target <= 2.0 with
    top_layers=1; top_layers=2 is reported to show the trade-off.
(c) Routing accuracy of the two routers on held-out hh-rlhf contexts: both heads trained the same way
    (``train_router`` with the demo's settings) on the same real rows of data/hh-rlhf-demo, helpful vs
    red_team as in configs/demo.yaml, early-stopped on a validation slice, scored on disjoint rows (no
    prompt shared with training). ``--sweep`` adds a grid of (layers, max_context_tokens), to choose them.

Ratios are medians over repetitions in which the compared scorers run alternately on the same inputs.
Times are process CPU seconds with one torch thread (the machine is shared, so wall time measures the
neighbours' load as much as ours; rows/s is then rows per core-second); the headline speedup is also given
from wall time. Rows are truncated to 128 tokens by default so the whole run fits in ~3 minutes.
The last line printed is one JSON object of figures.

    python bench/bench_scorer.py [--rows 64] [--released-rows 16] [--experts 5] [--cost-rows 32] [--repeats 3]
                                 [--sweep]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence

import torch
from _common import REPO, build_category, interleaved, load_rows, load_samples, median_ratio, setup

from dmoerm.config import RouterConfig, load_config
from dmoerm.data.records import Turn
from dmoerm.modeling.backbone import Backbone, load_backbone, pool
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead, RouterInput, context_features
from dmoerm.modeling.top import LoraConfig, TopStack, default_target_modules
from dmoerm.training.phases import train_router

BATCH_SIZE = 32
FULL_TRUNK = RouterInput(source="context")  # the old router: whole trunk, whole (max_length) context


def demo_router() -> RouterConfig:
    """The router as configs/demo.yaml configures it ("the router" of every figure)."""
    return load_config(REPO / "configs" / "demo.yaml").router


def router_input(spec: RouterInput) -> RouterInput:
    return RouterInput(spec.layers, spec.max_context_tokens, spec.source)


class ReleasedCategory:
    """The released code's inner model: a full peft-wrapped backbone, one adapter and one value head per
    expert, run expert by expert at batch size 1. Weights copied from ``cat`` so outputs must agree."""

    def __init__(self, backbone: Backbone, cat: CategoryModel) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora = LoraConfig()
        cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                         target_modules=default_target_modules(backbone.layers),
                         layers_to_transform=list(range(backbone.split, backbone.num_layers)))
        model = get_peft_model(copy.deepcopy(backbone.model), cfg, adapter_name=cat.capabilities[0])
        for name in cat.capabilities[1:]:
            model.add_adapter(name, cfg)
        ours = {re.sub(r"blocks\.(\d+)\.", lambda m: f"{backbone.layers_name}.{backbone.split + int(m[1])}.", n): p
                for n, p in cat.experts.named_parameters() if "lora_" in n}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(ours.pop(n))
        if ours:
            raise RuntimeError(f"LoRA weights without a counterpart in the full model: {list(ours)[:3]}")
        heads = cat.experts.base_model.model.value_head.modules_to_save
        self.model, self.heads = model.eval(), {c: copy.deepcopy(heads[c]) for c in cat.capabilities}
        self.backbone, self.cat = backbone, cat

    @torch.no_grad()
    def score_one(self, context: list[Turn], response: str) -> float:
        enc = self.backbone.encode([context], [response])  # (1, T)
        pooled = []
        for cap in self.cat.capabilities:
            self.model.set_adapter(cap)
            hidden = self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
            h = pool(hidden, enc.attention_mask, self.backbone.pooling)  # (1, H)
            self.heads[cap](h)  # the expert's own score, computed as the released code did
            pooled.append(h)
        return float(self.cat.aggregator(torch.stack(pooled, 1)))  # (1, K, H) -> (1,)


def score_released(released: dict[str, ReleasedCategory], contexts: Sequence[list[Turn]],
                   responses: Sequence[str], names: Sequence[str]) -> list[float]:
    return [released[n].score_one(c, r) for c, r, n in zip(contexts, responses, names)]


class UnroutedRewardModel(RewardModel):
    """``RewardModel`` whose route is the constant single category: the experts' cost without the router."""

    def route(self, contexts: Sequence[Sequence[Turn]]) -> tuple[list[str], list[float], torch.Tensor]:
        n = len(contexts)
        return [self.router.categories[0]] * n, [1.0] * n, torch.ones(n, 1)


def bench_released(rows: int, released_rows: int, num_experts: int, max_length: int, repeats: int,
                   router_inputs: RouterInput) -> dict:
    backbone = load_backbone("minilm", top_layers=1, max_length=max_length)
    contexts, responses = load_rows(rows)
    names_all = ["helpful", "red_team"]
    torch.manual_seed(0)
    router = RouterHead(backbone.hidden_size, names_all, inputs=router_inputs).eval()
    cats = {n: build_category(backbone, n, num_experts, seed=i) for i, n in enumerate(names_all)}
    model = RewardModel(backbone, router, cats, batch_size=BATCH_SIZE)
    released = {n: ReleasedCategory(backbone, c) for n, c in cats.items()}
    sub = list(range(0, rows, max(1, rows // released_rows)))[:released_rows]  # a stride subset
    sub_ctx, sub_resp = [contexts[i] for i in sub], [responses[i] for i in sub]
    routed = model.route(sub_ctx)[0]  # handed to the released way, untimed

    ours = model.score(contexts, responses)  # also the warm-up
    theirs = score_released(released, sub_ctx, sub_resp, routed)
    diff = max(abs(ours[i].reward - t) for i, t in zip(sub, theirs))
    if diff > 1e-3:
        raise RuntimeError(f"the two scorers disagree by {diff:.2e}: they are not computing the same model")
    cpu, wall = interleaved({"ours": lambda: model.score(contexts, responses),
                             "released": lambda: score_released(released, sub_ctx, sub_resp, routed)}, repeats)
    ours_rate = [rows / t for t in cpu["ours"]]
    released_rate = [len(sub) / t for t in cpu["released"]]
    wall_speedup = median_ratio([rows / t for t in wall["ours"]], [len(sub) / t for t in wall["released"]])
    return {"scorer_rows_per_s": round(statistics.median(ours_rate), 2),
            "released_rows_per_s": round(statistics.median(released_rate), 2),
            "speedup_vs_released": round(median_ratio(ours_rate, released_rate), 2),
            "speedup_vs_released_wall": round(wall_speedup, 2),
            "scorer_experts_per_category": num_experts, "scorer_rows": rows, "released_rows": len(sub),
            "scorer_max_reward_diff_vs_released": float(f"{diff:.1e}")}


def bench_cost(top_layers: int, rows: int, max_length: int, repeats: int, ks: Sequence[int],
               router_inputs: RouterInput) -> dict:
    """Ratios of K-expert scoring to the single RM. The routers are timed on their own (they read the
    contexts alone, so their cost does not depend on K) and added for the ``_with_*router`` figures."""
    backbone = load_backbone("minilm", top_layers=top_layers, max_length=max_length)
    contexts, responses = load_rows(rows)
    torch.manual_seed(0)
    single = SingleRewardModel(backbone, TopStack(backbone), batch_size=BATCH_SIZE)
    scorers: dict[str, Callable[[list, list], object]] = {"single": single.score}
    for k in ks:
        cat = build_category(backbone, "chat", k, seed=k)
        router = RouterHead(backbone.hidden_size, ["chat"]).eval()
        scorers[f"k{k}"] = UnroutedRewardModel(backbone, router, {"chat": cat}, batch_size=BATCH_SIZE).score
    for name, inputs in (("router", router_inputs), ("router_full", FULL_TRUNK)):
        routed = RewardModel(backbone, RouterHead(backbone.hidden_size, ["chat"], inputs=inputs).eval(),
                             {"chat": cat}, batch_size=BATCH_SIZE)
        scorers[name] = lambda c, _r, m=routed: m.route(c)
    for fn in scorers.values():  # warm-up
        fn(contexts[:4], responses[:4])
    times, _ = interleaved({n: functools.partial(fn, contexts, responses) for n, fn in scorers.items()}, repeats)
    t = f"top{top_layers}"
    out = {f"cost_ratio_k{k}_{t}": round(median_ratio(times[f"k{k}"], times["single"]), 2) for k in ks}
    for router, suffix in (("router", "with_router"), ("router_full", "with_full_trunk_router")):
        for k in ks:
            with_router = [a + b for a, b in zip(times[f"k{k}"], times[router])]
            out[f"cost_ratio_k{k}_{t}_{suffix}"] = round(median_ratio(with_router, times["single"]), 2)
    out[f"router_cost_ratio_{t}"] = round(median_ratio(times["router"], times["single"]), 3)
    out[f"router_full_trunk_cost_ratio_{t}"] = round(median_ratio(times["router_full"], times["single"]), 3)
    out[f"single_rm_rows_per_s_{t}"] = round(rows / statistics.median(times["single"]), 2)
    return out


def router_splits(num_per_file: int) -> dict[str, tuple[list, torch.Tensor]]:
    """Train / validation / test (contexts, labels) of helpful (0) vs red_team (1): the first 40% of each
    file's samples train, the next 10% validate, the rest test, minus test prompts seen in training."""
    samples = load_samples(num_per_file)
    per_file = len(samples) // 2
    cuts = {"train": (0, int(0.4 * per_file)), "val": (int(0.4 * per_file), int(0.5 * per_file)),
            "test": (int(0.5 * per_file), per_file)}
    parts = {name: samples[2 * a: 2 * b] for name, (a, b) in cuts.items()}  # load_samples interleaves the files
    seen = {s.prompt_key for s in parts["train"] + parts["val"]}
    parts["test"] = [s for s in parts["test"] if s.prompt_key not in seen]
    names = ["helpful", "red_team"]
    return {n: ([s.context for s in p], torch.tensor([names.index(s.category) for s in p])) for n, p in parts.items()}


def bench_router_accuracy(max_length: int, spec: RouterConfig, num_per_file: int, sweep: bool) -> dict:
    """Test accuracy of the old full-trunk router and the configured one (and a grid with ``sweep``),
    each trained on the same rows; the delta's standard error is the paired one (same test rows)."""
    backbone = load_backbone("minilm", top_layers=1, max_length=max_length)
    data = router_splits(num_per_file)
    variants = {"full_trunk": FULL_TRUNK, "configured": router_input(spec)}
    if sweep:
        for layers in (0, 1, 2, 3, None):
            for tokens in (16, 32, 64, None):
                variants[f"l{layers}_n{tokens}"] = RouterInput(layers, tokens, "context")
    correct = {}
    for name, inputs in variants.items():
        x = {n: context_features(backbone, c, inputs, batch_size=BATCH_SIZE) for n, (c, _) in data.items()}
        head, _ = train_router(x["train"], data["train"][1], x["val"], data["val"][1], ["helpful", "red_team"],
                               spec.train, width=spec.width, seed=0, inputs=inputs)
        with torch.no_grad():
            correct[name] = (head(x["test"]).argmax(-1) == data["test"][1]).float()  # (N_test,)
        if sweep:
            print(f"(c) {name}: test accuracy {correct[name].mean():.4f}", flush=True)
    n = len(data["test"][1])
    acc = {k: v.mean().item() for k, v in correct.items()}
    diff = correct["configured"] - correct["full_trunk"]  # paired per-row differences
    return {"router_accuracy_full_trunk": round(acc["full_trunk"], 4), "router_accuracy": round(acc["configured"], 4),
            "router_accuracy_delta": round(diff.mean().item(), 4),
            "router_accuracy_delta_se": round(diff.std().item() / math.sqrt(n), 4),
            "router_accuracy_se": round(math.sqrt(acc["full_trunk"] * (1 - acc["full_trunk"]) / n), 4),
            "router_train_contexts": len(data["train"][1]), "router_test_contexts": n,
            "router_layers": spec.layers, "router_max_context_tokens": spec.max_context_tokens,
            **({f"router_accuracy_{k}": round(v, 4) for k, v in acc.items() if k not in ("full_trunk", "configured")}
               if sweep else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows scored by our scorer in (a)")
    parser.add_argument("--released-rows", type=int, default=16, help="rows (a stride subset) for the released way")
    parser.add_argument("--experts", type=int, default=5, help="experts per category in (a)")
    parser.add_argument("--cost-rows", type=int, default=32, help="rows scored in the cost ratios of (b)")
    parser.add_argument("--max-length", type=int, default=128, help="token budget per row")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed repetitions (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--router-samples", type=int, default=1000, help="samples per hh file for (c)")
    parser.add_argument("--sweep", action="store_true", help="(c) over a grid of layers x max_context_tokens")
    args = parser.parse_args()
    setup(args.threads)
    spec = demo_router()
    print(f"router (configs/demo.yaml): layers={spec.layers} max_context_tokens={spec.max_context_tokens}", flush=True)

    figures = bench_released(args.rows, args.released_rows, args.experts, args.max_length, args.repeats,
                             router_input(spec))
    print(f"(a) scorer vs released: {figures}", flush=True)
    ks = [3, 4, 5, 6]
    for top_layers in (1, 2):
        cost = bench_cost(top_layers, args.cost_rows, args.max_length, args.repeats, ks, router_input(spec))
        print(f"(b) top_layers={top_layers}: {cost}", flush=True)
        figures.update(cost)
    for k in ks:  # the headline names: top_layers=1
        figures[f"cost_ratio_k{k}"] = figures[f"cost_ratio_k{k}_top1"]
        figures[f"cost_ratio_k{k}_with_router"] = figures[f"cost_ratio_k{k}_top1_with_router"]
    accuracy = bench_router_accuracy(args.max_length, spec, args.router_samples, args.sweep)
    print(f"(c) routing accuracy: {accuracy}", flush=True)
    figures.update(accuracy)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
