"""The typed pipeline config (dmoerm.config): every shipped config loads; overrides are typed; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmoerm.config import PipelineConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = [p for p in sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
           if not p.name.startswith("study_")]  # study configs: each study's tests load its own
DEMO = CONFIGS / "demo.yaml"


def _minimal(**changes) -> dict:
    raw = {"taxonomy": [{"name": "chat", "capabilities": ["empathy"]}, {"name": "qa", "capabilities": ["logic"]}],
           "data": {"sources": [{"path": "a.jsonl", "format": "hh", "category": "chat"}]},
           "labels": {"source": "dataset", "datasets": {"empathy": [{"path": "e.jsonl", "format": "hh"}],
                                                        "logic": [{"path": "l.jsonl", "format": "hh"}]}}}
    raw.update(changes)
    return raw


def test_configs_are_shipped():
    assert DEMO in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(CONFIGS).as_posix() for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig) and cfg.taxonomy
    for src in cfg.data.sources:  # relative data paths are resolved against the config's folder
        assert "://" in src.path or Path(src.path).is_absolute()


def test_dotted_overrides_apply_with_types():
    cfg = load_config(DEMO, ["phase1.lr=5e-5", "model.top_layers=2", "baseline=false", "model.lora.r=8",
                             "aggregator.hidden_size=null", "data.splits.seed=7", "name=run-7"])
    assert cfg.phase1.lr == 5e-5 and isinstance(cfg.phase1.lr, float)
    assert cfg.model.top_layers == 2 and isinstance(cfg.model.top_layers, int)
    assert cfg.baseline is False and cfg.model.lora.r == 8 and cfg.aggregator.hidden_size is None
    assert cfg.data.splits.seed == 7 and cfg.name == "run-7"
    from_file = load_config(DEMO)
    assert cfg.phase1.epochs == from_file.phase1.epochs  # untouched keys keep the file's values
    assert from_file.phase1.lr != 5e-5


@pytest.mark.parametrize(("override", "message"), [
    ("phase1.lrr=1", r"unknown config field\(s\) phase1\.lrr"),
    ("nope=1", r"unknown config field\(s\) nope"),
    ("model.top_layers=abc", r"model\.top_layers: expected an integer"),
    ("model.top_layers=1.5", r"model\.top_layers: expected an integer"),
    ("model.pooling=max", r"model\.pooling: must be one of"),
    ("baseline=maybe", r"baseline: expected true or false"),
    ("phase1=3", r"phase1: expected a mapping"),
    ("phase1.lr=0", r"phase1: lr must be > 0"),
    ("aggregator.dropout=2", r"aggregator\.dropout must be in"),
    ("model.lora.r=0", r"model\.lora: lora\.r"),
    ("data.splits.phase1=0.9", r"data\.splits: .*sum to 1"),
    ("labels.source=judge", r"labels: labels\.source=judge needs a labels\.judge"),
    ("labels.source=crowd", r"labels\.source: must be one of"),
    ("taxonomy=[]", r"taxonomy must list at least one category"),
])
def test_bad_overrides_raise_value_error_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEMO, [override])


def test_malformed_override_and_missing_file_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config(DEMO, ["phase1.lr"])
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_minimal_config_from_a_dict():
    cfg = load_config(data=_minimal())
    assert cfg.capabilities == {"chat": ["empathy"], "qa": ["logic"]}
    assert cfg.model.base == "minilm" and cfg.phase3.batch_size == 64


def test_a_source_category_outside_the_taxonomy_is_rejected():
    raw = _minimal(data={"sources": [{"path": "a.jsonl", "format": "hh", "category": "poetry"}]})
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.category 'poetry' is not in the taxonomy"):
        load_config(data=raw)


def test_dataset_labels_need_a_dataset_for_every_capability():
    raw = _minimal(labels={"source": "dataset", "datasets": {"empathy": [{"path": "e.jsonl", "format": "hh"}]}})
    with pytest.raises(ValueError, match=r"labels\.datasets has no dataset for \['logic'\]"):
        load_config(data=raw)


@pytest.mark.parametrize(("change", "message"), [
    ({"taxonomy": [{"name": "a", "capabilities": ["x"]}, {"name": "a", "capabilities": ["x"]}]}, "duplicate"),
    ({"taxonomy": [{"name": "a", "capabilities": []}]}, "lists no capabilities"),
    ({"taxonomy": [{"name": "a"}]}, "capabilities"),
    ({"data": {"sources": [{"path": "a.jsonl", "format": "csv"}]}}, r"data\.sources\[0\]\.format"),
])
def test_bad_taxonomies_and_sources_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        load_config(data=_minimal(**change))


@pytest.mark.parametrize(("taxonomy", "message"), [
    ([{"name": "chat\tqa", "capabilities": ["x"]}], r"taxonomy\[0\]: name: category name 'chat\\tqa' contains control"),
    ([{"name": "chat", "capabilities": [" empathy"]}],
     r"taxonomy\[0\]: capabilities\[0\]: capability name ' empathy' has leading or trailing whitespace"),
    ([{"name": "chat", "capabilities": ["x", "x"]}], r"taxonomy\[0\]: capabilities: duplicate capability 'x'"),
])
def test_names_are_validated_where_the_taxonomy_declares_them(taxonomy, message):
    """Category and capability names become folders, files and adapter names: checked when the config loads,
    not when the bundle is finally written."""
    raw = _minimal(taxonomy=taxonomy, labels={"source": "dataset", "datasets": {}})
    with pytest.raises(ValueError, match=message):
        load_config(data=raw)


def test_category_looks_up_the_taxonomy():
    cfg = load_config(data=_minimal())
    assert cfg.category("qa").capabilities == ["logic"]
    with pytest.raises(ValueError, match=r"unknown category 'poetry'; the taxonomy has \['chat', 'qa'\]"):
        cfg.category("poetry")


def test_paths_are_resolved_once_when_the_config_loads(tmp_path, monkeypatch):
    """Inputs relative to the config file's folder; storage and output relative to the working directory;
    URIs untouched."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO, ["output_dir=out", "platform.storage_uri=store"])
    assert cfg.output_dir == str(tmp_path / "out") and cfg.platform.storage_uri == str(tmp_path / "store")
    assert cfg.data.sources[0].path.startswith(str(CONFIGS.parent / "data"))
    s3 = load_config(data=_minimal(output_dir="s3://b/out", platform={"storage_uri": "s3://b/store"}))
    assert (s3.output_dir, s3.platform.storage_uri) == ("s3://b/out", "s3://b/store")


def test_a_category_cannot_take_the_baselines_name():
    raw = {"taxonomy": [{"name": "baseline", "capabilities": ["x"]}],
           "data": {"sources": [{"path": "d.jsonl", "format": "dmoerm"}]},
           "labels": {"source": "judge", "judge": {"model": "m", "base_url": "http://judge"}}}
    with pytest.raises(ValueError, match="'baseline' is taken"):
        load_config(data=raw)
    assert load_config(data={**raw, "baseline": False}).taxonomy[0].name == "baseline"
