"""The model bundle: everything needed to score, in one versioned folder.

    bundle.json                  format version, base model reference + revision + weight fingerprint,
                                 pooling, max length, precision, taxonomy, router inputs (layers, max context
                                 tokens, source), LoRA and aggregator settings, metrics
    tokenizer/                   the tokenizer files
    router.safetensors           router head
    categories/<dir>/experts.safetensors      top blocks + every LoRA adapter + every expert's value head
    categories/<dir>/aggregator.safetensors   (<dir>: the category's ``safe_name``, recorded as its ``dir``)
    baseline.safetensors         the single-RM baseline's top (optional)
    ensemble/                    RM ensemble baselines (optional, ``dmoerm.ensemble``: members + ensemble.json)

``bundle.json`` may also hold ``capability_stats`` (``dmoerm.uncertainty``): each category's expert-score
mean and std on training rows, for the uncertainty-penalised reward.

Weights are safetensors only; metadata is JSON. Never pickle.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmoerm.device import Precision, resolve_device
from dmoerm.modeling.aggregator import Aggregator, AggregatorConfig
from dmoerm.modeling.backbone import Backbone, load_backbone
from dmoerm.modeling.reward_model import CategoryModel, RewardModel, SingleRewardModel
from dmoerm.modeling.router import RouterHead, RouterInput
from dmoerm.modeling.top import LoraConfig, TopStack, attach_experts
from dmoerm.names import check_name, check_unique, safe_name

logger = logging.getLogger(__name__)
BUNDLE_FORMAT = 1


def save_tensors(tensors: dict, path: Path) -> None:
    """Detached, contiguous CPU copies to one safetensors file (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def base_meta(bb: Backbone) -> dict[str, Any]:
    """The ``base`` entry of a bundle (and of an ensemble, ``dmoerm.ensemble``): what the frozen base is."""
    return {"reference": bb.reference, "revision": bb.revision, "fingerprint": bb.fingerprint(),
            "model_type": getattr(bb.model.config, "model_type", ""), "top_layers": bb.top_layers,
            "pooling": bb.pooling, "max_length": bb.max_length, "hidden_size": bb.hidden_size,
            "precision": bb.precision}


@dataclass
class LoadedBundle:
    model: RewardModel
    baseline: SingleRewardModel | None
    meta: dict[str, Any]
    path: Path


def save_bundle(path: str | Path, model: RewardModel, *, lora: LoraConfig, aggregator: AggregatorConfig,
                router_width: int, baseline: TopStack | None = None, metrics: dict | None = None,
                extra: dict | None = None) -> str:
    """Write the bundle to a local folder or an ``s3://`` prefix; returns where it was written."""
    from dmoerm import storage

    target = str(path)
    local = Path(tempfile.mkdtemp(prefix="dmoerm-bundle-")) if storage.is_s3(target) else Path(target)
    local.mkdir(parents=True, exist_ok=True)
    bb = model.backbone
    for name, cat in model.categories.items():  # a model built in code never went through CategoryConfig
        check_name(f"categories[{name!r}]", name, "category name")
        for i, cap in enumerate(cat.capabilities):
            check_name(f"categories[{name!r}].capabilities[{i}]", cap, "capability name")
        check_unique(f"categories[{name!r}].capabilities", cat.capabilities, "capability")
    check_unique("categories", list(model.categories), "category")
    meta = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": base_meta(bb),
        "taxonomy": [{"name": c.name, "dir": safe_name(c.name), "capabilities": c.capabilities,
                      "aggregator": asdict(c.aggregator.spec)} for c in model.categories.values()],
        "router": router_meta(model.router_inputs, router_width),
        "lora": asdict(lora),
        "aggregator": asdict(aggregator),
        "baseline": baseline is not None,
        "metrics": metrics or {},
        **(extra or {}),
    }
    bb.tokenizer.save_pretrained(str(local / "tokenizer"))
    save_tensors(model.router.state_dict(), local / "router.safetensors")
    for name, cat in model.categories.items():
        folder = local / "categories" / safe_name(name)
        save_tensors(cat.experts.state_dict(), folder / "experts.safetensors")
        save_tensors(cat.aggregator.state_dict(), folder / "aggregator.safetensors")
    if baseline is not None:
        save_tensors(baseline.state_dict(), local / "baseline.safetensors")
    (local / "bundle.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    if storage.is_s3(target):
        storage.upload_dir(str(local), target)
    logger.info("bundle written to %s", target)
    return target


def router_meta(inputs: RouterInput, width: int) -> dict[str, Any]:
    """The bundle's ``router`` entry: its width and what it reads (``inputs`` resolved on the backbone)."""
    depth = "the whole trunk" if inputs.layers is None else f"the first {inputs.layers} blocks"
    span = "" if inputs.max_context_tokens is None else f", last {inputs.max_context_tokens} tokens"
    return {"width": width, "layers": inputs.layers, "max_context_tokens": inputs.max_context_tokens,
            "source": inputs.source, "features": f"mean-pool of the context{span} after {depth} ({inputs.source})"}


def router_inputs_of(entry: dict[str, Any]) -> RouterInput:
    """``router_meta`` read back; bundles written before these settings existed routed from a full-trunk
    pass over the whole (max_length) context, which is what the missing keys mean."""
    return RouterInput(layers=entry.get("layers"), max_context_tokens=entry.get("max_context_tokens"),
                       source=entry.get("source", "context"))


def category_dir(entry: dict[str, Any], bundle: Path) -> str:
    """The folder under ``categories/`` of a bundle's taxonomy entry: its recorded ``dir`` (bundles written
    before it was recorded: the name itself, which was then restricted to a plain folder name). A ``dir``
    that is not one safe path component is refused (nothing is read outside the bundle)."""
    folder = entry.get("dir", entry["name"])
    if not isinstance(folder, str) or folder in ("", ".", "..") or folder.startswith(".") or any(
            sep in folder for sep in ("/", "\\", "\0")):
        raise ValueError(f"{bundle}/bundle.json: category {entry['name']!r} has folder {folder!r}, not one plain "
                         "folder name under categories/")
    return folder


def read_format_json(path: str | Path, name: str, fmt: int, kind: str, what: str) -> dict[str, Any]:
    """``<path>/<name>``, refused with a clear error when missing (not ``what``) or of another ``kind`` format."""
    meta_path = Path(path) / name
    if not meta_path.exists():
        raise ValueError(f"{path} is not {what}: {name} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{meta_path}: {kind} format {meta.get('format')} is not supported "
                         f"(this version reads format {fmt})")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    return read_format_json(path, "bundle.json", BUNDLE_FORMAT, "bundle", "a DMoERM bundle")


def load_bundle(path: str | Path, *, base: str | None = None, batch_size: int = 32,
                max_batch_tokens: int | None = None, backbone: Backbone | None = None,
                trust_remote_code: bool = False, check_fingerprint: bool = True,
                categories: list[str] | None = None, device: str | torch.device = "auto",
                precision: Precision | None = None) -> LoadedBundle:
    """Load a bundle from a folder or an ``s3://`` prefix. ``base`` overrides where the base weights are
    read from (the same weights: their fingerprint is checked). ``batch_size`` and ``max_batch_tokens``
    bound the scorers' batches (rows, and padded tokens).

    ``device`` is where the model scores (``auto``: cuda when torch sees a GPU, else cpu) and
    ``precision`` how (None: the precision it was trained in, ``base.precision`` of bundle.json; bundles
    written before it was recorded were float32). A bfloat16 bundle on a CPU device is refused unless
    ``precision="float32"`` is asked for. Both apply when the base is loaded here; a given ``backbone``
    keeps its own (it must match ``precision`` when that is given).

    ``categories`` loads only those categories' experts and aggregators (a serving replica that holds a
    few categories on a shared ``backbone``); such a model scores rows whose category is given, and has no
    trained router (nor the baseline) unless every category is loaded."""
    from dmoerm import storage

    src = str(path)
    if storage.is_s3(src):
        local = Path(tempfile.mkdtemp(prefix="dmoerm-bundle-"))
        storage.download_dir(src, str(local))
    else:
        local = Path(src)
    meta = read_meta(local)
    b = meta["base"]
    if backbone is None:
        trained = b.get("precision", "float32")
        dev = resolve_device(device)
        if precision is None and trained != "float32" and dev.type != "cuda":
            raise ValueError(f"{local}/bundle.json: this model was trained in {trained} (base.precision), which "
                             f"scores on CUDA only, but the device is {str(dev)!r}; load it with device='cuda', "
                             "or pass precision='float32' to score it in float32 here")
        backbone = load_backbone(base or b["reference"], top_layers=b["top_layers"], pooling=b["pooling"],
                                 max_length=b["max_length"], revision=b["revision"],
                                 trust_remote_code=trust_remote_code, tokenizer_path=str(local / "tokenizer"),
                                 device=dev, precision=precision or trained)
    elif precision is not None and precision != backbone.precision:
        raise ValueError(f"load_bundle: precision={precision!r} but the given backbone computes in "
                         f"{backbone.precision!r}")
    if check_fingerprint and backbone.fingerprint() != b["fingerprint"]:
        raise ValueError(f"{local}: the base model at {base or b['reference']!r} is not the one this bundle "
                         "was trained on (weight fingerprint differs)")
    lora = LoraConfig(**meta["lora"])
    spec = AggregatorConfig(**meta["aggregator"])
    names = [c["name"] for c in meta["taxonomy"]]
    subset = categories is not None and list(categories) != names
    if categories is not None:
        unknown = sorted(set(categories) - set(names))
        if unknown or not categories:
            raise ValueError(f"{local}: categories {unknown or categories} not in this bundle's {names}")
    keep = [n for n in names if not subset or n in categories]
    router = RouterHead(backbone.hidden_size, keep, width=meta["router"]["width"],
                        inputs=router_inputs_of(meta["router"]))
    if not subset:
        router.load_state_dict(load_file(str(local / "router.safetensors")))
    loaded = {}
    for c in meta["taxonomy"]:
        if c["name"] not in keep:
            continue
        folder = local / "categories" / category_dir(c, local)
        experts = attach_experts(TopStack(backbone), c["capabilities"], lora)
        experts.load_state_dict(load_file(str(folder / "experts.safetensors")))
        agg = Aggregator(len(c["capabilities"]), backbone.hidden_size,
                         AggregatorConfig(**c["aggregator"]) if "aggregator" in c else spec)
        agg.load_state_dict(load_file(str(folder / "aggregator.safetensors")))
        loaded[c["name"]] = CategoryModel(c["name"], list(c["capabilities"]), experts, agg)
    model = RewardModel(backbone, router, loaded, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    baseline = None
    if meta.get("baseline") and not subset:
        top = TopStack(backbone)
        top.load_state_dict(load_file(str(local / "baseline.safetensors")))
        baseline = SingleRewardModel(backbone, top, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    return LoadedBundle(model=model, baseline=baseline, meta=meta, path=local)
