"""DMoERM's training recipe (arXiv 2403.01197, as the README's "The method, as built" lists it) on cached
trunk features.

Phase 1 fine-tunes a category's ``TopStack`` (top blocks + value head) on human ranks. Phase 2 adds one
LoRA adapter per capability to it and trains each adapter with its own value head on that capability's
labels. Phase 3 freezes everything, computes every expert's pooled hidden state once per response and
trains the aggregator on those cached features. The single-RM baseline is phase 1 on all data.

Device: the tops train on the backbone's device in its precision (each collated batch moved there); the
router and the aggregator train where their features are unless ``device`` says otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmoerm.data.records import Sample
from dmoerm.device import feature_dtype, to_device
from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig
from dmoerm.modeling.backbone import Backbone, length_batches
from dmoerm.modeling.router import RouterHead, RouterInput
from dmoerm.modeling.top import TopStack, adapter_name, owned_by, run_experts
from dmoerm.training.features import TrunkFeatures
from dmoerm.training.loop import FitHooks, FitResult, Group, MetricFn, TrainConfig, fit_pairwise

logger = logging.getLogger(__name__)


def human_groups(samples: Sequence[Sample], cache: TrunkFeatures) -> list[Group]:
    """One group per sample: its responses' trunk rows and every differently-ranked pair."""
    return [Group([cache.row(s.context, r) for r in s.responses], s.pairs()) for s in samples]


def capability_groups(samples: Sequence[Sample], capability: str, cache: TrunkFeatures) -> list[Group]:
    """One group per sample that carries labels for ``capability``."""
    return [Group([cache.row(s.context, r) for r in s.responses], list(s.capability_prefs[capability]))
            for s in samples if s.capability_prefs.get(capability)]


def top_reward_fn(model: nn.Module, backbone: Backbone, cache: TrunkFeatures):
    """Reward of cached rows through a TopStack (or its peft wrapper with the active adapter)."""

    def reward(rows: Sequence[int]) -> torch.Tensor:
        hidden, mask = to_device(cache.collate(rows), backbone.device)  # (N, T, H), (N, T)
        args, kwargs = backbone.layer_inputs(mask)
        return model(hidden, mask, args, kwargs)[1]  # (N,)

    return reward


def train_top(backbone: Backbone, cache: TrunkFeatures, train: Sequence[Sample], val: Sequence[Sample],
              settings: TrainConfig, *, seed: int = 0, desc: str = "phase1", hooks: FitHooks | None = None
              ) -> tuple[TopStack, FitResult]:
    """Phase 1 (and the single-RM baseline): fine-tune the top blocks and a value head on human ranks."""
    torch.manual_seed(seed)
    top = TopStack(backbone)
    result = fit_pairwise(top, [p for p in top.parameters() if p.requires_grad],
                          top_reward_fn(top, backbone, cache), human_groups(train, cache),
                          human_groups(val, cache), cache.lengths(), settings, seed=seed, desc=desc, hooks=hooks)
    return top, result


def train_expert(experts: nn.Module, capability: str, backbone: Backbone, cache: TrunkFeatures,
                 train: Sequence[Group], val: Sequence[Group], settings: TrainConfig, *, seed: int = 0,
                 desc: str | None = None, hooks: FitHooks | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> FitResult:
    """Phase 2 for one capability: only its LoRA weights and its own value head are trained.
    ``wrap`` wraps the model for data parallelism (e.g. DDP) in the forward only."""
    torch.manual_seed(seed)
    experts.set_adapter(adapter_name(capability))
    params = [p for p in experts.parameters() if p.requires_grad]
    own = [n for n, p in experts.named_parameters() if p.requires_grad]
    if not own or not all(owned_by(n, capability) for n in own):
        raise RuntimeError(f"expert {capability!r}: trainable parameters outside its adapter: {own[:3]}")
    experts.to(backbone.device)  # before any data-parallel wrapper is built around it
    model = wrap(experts) if wrap else experts
    return fit_pairwise(experts, params, top_reward_fn(model, backbone, cache), train, val, cache.lengths(),
                        settings, seed=seed, desc=desc or f"expert/{capability}", hooks=hooks)


@torch.no_grad()
def expert_features(experts: nn.Module, capabilities: list[str], backbone: Backbone, cache: TrunkFeatures,
                    rows: Sequence[int], batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """Frozen experts' pooled hidden states for ``rows``, computed once on the backbone's device: (len(rows),
    K, H) on the CPU, in the precision's dtype (bf16 for ``bfloat16``: the cache holds what scoring feeds
    the aggregator)."""
    experts.eval().to(backbone.device)
    out = torch.zeros(len(rows), len(capabilities), backbone.hidden_size, dtype=feature_dtype(backbone.precision))
    bar = tqdm(total=len(rows), desc="expert features", unit="row", disable=not progress, leave=False)
    lengths = cache.lengths()
    for idx in length_batches([lengths[r] for r in rows], batch_size):
        hidden, mask = to_device(cache.collate([rows[i] for i in idx]), backbone.device)
        pooled = run_experts(experts, capabilities, backbone, hidden, mask).pooled  # (B, K, H)
        out[idx] = pooled.to("cpu", out.dtype)
        bar.update(len(idx))
    bar.close()
    return out


def phase3_features(experts: nn.Module, capabilities: list[str], backbone: Backbone, cache: TrunkFeatures,
                    train: Sequence[Sample], val: Sequence[Sample], batch_size: int = 32, progress: bool = True
                    ) -> tuple[torch.Tensor, list[Group], list[Group]]:
    """Expert features of every phase-3 and validation row, computed once: (R, K, H), and the two group
    lists re-indexed into those R rows."""
    tg, vg = human_groups(train, cache), human_groups(val, cache)
    rows = sorted({r for g in tg + vg for r in g.rows})
    local = {r: i for i, r in enumerate(rows)}
    feats = expert_features(experts, capabilities, backbone, cache, rows, batch_size, progress=progress)

    def remap(groups: list[Group]) -> list[Group]:
        return [Group([local[r] for r in g.rows], g.pairs) for g in groups]

    return feats, remap(tg), remap(vg)


def train_aggregator(features: torch.Tensor, train: Sequence[Group], val: Sequence[Group],
                     spec: AggregatorConfig, settings: TrainConfig, *, seed: int = 0, desc: str = "phase3",
                     hooks: FitHooks | None = None, device: torch.device | str | None = None
                     ) -> tuple[Aggregator, FitResult]:
    """Phase 3 on cached expert features (rows of ``features`` are the groups' row ids), in float32 on
    ``device`` (None: the features' device), each batch moved there."""
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else features.device
    agg = Aggregator(features.size(1), features.size(2), spec).to(device)
    lengths = [1] * features.size(0)

    def reward(rows: Sequence[int]) -> torch.Tensor:
        return agg(features[list(rows)].to(device, torch.float32))  # (N, K, H) -> (N,)

    result = fit_pairwise(agg, list(agg.parameters()), reward, train, val, lengths, settings, seed=seed, desc=desc,
                          hooks=hooks, device=device)
    return agg, result


def train_router(features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, categories: list[str], settings: TrainConfig, *, width: int = 0,
                 seed: int = 0, log_metric: MetricFn | None = None, inputs: RouterInput | None = None,
                 device: torch.device | str | None = None) -> tuple[RouterHead, dict]:
    """Cross-entropy on logits over categories; early stopping on validation accuracy. ``features`` are
    ``context_features`` computed with ``inputs``, which the head records (it scores with the same). The
    head trains in float32 on ``device`` (None: the features' device) and is returned there."""
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else features.device
    features, labels, val_features, val_labels = to_device((features, labels, val_features, val_labels), device)
    head = RouterHead(features.size(1), categories, width=width, inputs=inputs).to(device)
    if len(categories) == 1:
        return head.eval(), {"router_val_accuracy": 1.0}
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, step = -1.0, None, 0, 0
    for epoch in range(settings.epochs):
        head.train()
        for idx in torch.randperm(features.size(0), generator=gen).to(device).split(settings.batch_size):
            loss = F.cross_entropy(head(features[idx]), labels[idx])  # logits, no softmax before the loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            acc = (head(val_features).argmax(-1) == val_labels).float().mean().item() if len(val_labels) else 0.0
        if log_metric:
            log_metric("router/val_accuracy", acc, epoch)
        if acc > best:
            best, best_state, bad = acc, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= settings.patience:
                break
    head.load_state_dict(best_state)
    return head.eval(), {"router_val_accuracy": best, "router_steps": step}
