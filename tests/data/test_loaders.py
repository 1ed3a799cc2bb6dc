"""Loaders on the real public files in ../shared/data and on small files written here."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from dmoerm.data import LoadResult, Sample, Skip, SourceConfig, load_source, write_samples
from dmoerm.data.loaders import IDENTICAL, NO_PAIR

PAPER = Path(__file__).resolve().parents[1] / "fixtures" / "paper_format.jsonl"
HH_SPLITS = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137,
             "helpful-rejection-sampled": 2749}


def _hh_records(shared_data: Path, n: int) -> list[dict]:
    with gzip.open(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("split", sorted(HH_SPLITS))
def test_hh_real_splits_load_every_record_or_count_it(shared_data, split, caplog):
    path = shared_data / "hh-rlhf" / split / "test.jsonl.gz"
    with caplog.at_level(logging.INFO, logger="dmoerm.data.loaders"):
        result = load_source(SourceConfig(str(path), "hh", category="helpful"))
    assert len(result.samples) + len(result.skipped) == HH_SPLITS[split]
    assert all(s.reason == IDENTICAL for s in result.skipped)  # no malformed record in the real data
    assert f"loaded {len(result.samples)} samples" in caplog.text
    s = result.samples[0]
    assert s.id == f"{split}/test:1" and s.ranks == [1, 2] and s.category == "helpful"
    assert s.context[0].role == "user" and s.context[-1].role == "user"
    assert all("\n\nHuman:" not in t.content and "\n\nAssistant:" not in t.content for t in s.context)


def test_hh_rank_one_is_the_chosen_text_and_context_is_shared(shared_data):
    raw = _hh_records(shared_data, 3)
    path = shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"
    s = load_source(SourceConfig(str(path), "hh", limit=3)).samples
    assert len(s) == 3
    for record, sample in zip(raw, s):
        best = sample.responses[sample.ranks.index(1)]
        assert record["chosen"].rstrip().endswith(best) and not record["rejected"].rstrip().endswith(best)
        assert sample.pairs() == [(0, 1)]


def test_hh_identical_is_skipped_even_when_raising(tmp_path):
    text = "\n\nHuman: hi\n\nAssistant: hello"
    path = _jsonl(tmp_path / "h.jsonl", [{"chosen": text, "rejected": text},
                                         {"chosen": text, "rejected": text + " there"}])
    result = load_source(SourceConfig(path, "hh", on_error="raise", name="h"))
    assert [s.id for s in result.samples] == ["h:2"]
    assert result.skipped == [Skip(1, None, IDENTICAL, path)]
    assert result.summary() == f"loaded 1 samples from {path}; skipped 1 (1 x 'identical responses')"


def test_hh_hallucinated_human_turn_stays_in_the_response(tmp_path):
    chosen = "\n\nHuman: plan a trip\n\nAssistant: Go to Oaxaca."
    rejected = "\n\nHuman: plan a trip\n\nAssistant: Go.\n\nHuman: thanks!"
    s = load_source(SourceConfig(_jsonl(tmp_path / "h.jsonl", [{"chosen": chosen, "rejected": rejected}]),
                                 "hh")).samples[0]
    assert [(t.role, t.content) for t in s.context] == [("user", "plan a trip")]
    assert s.responses == ["Go to Oaxaca.", "Go.\n\nHuman: thanks!"]


def _trl_rows(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The same hh pairs as TRL plain, conversational-implicit and conversational-explicit rows."""
    plain, implicit, explicit = [], [], []
    for r in records:
        head, _, good = r["chosen"].rpartition("\n\nAssistant:")
        bad = r["rejected"][len(head) + len("\n\nAssistant:"):]
        turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
                 for role, text in (t.split(":", 1) for t in head.split("\n\n")[1:])]
        prompt = turns
        plain.append({"prompt": turns[-1]["content"], "chosen": good.strip(), "rejected": bad.strip()})
        implicit.append({"chosen": prompt + [{"role": "assistant", "content": good.strip()}],
                         "rejected": prompt + [{"role": "assistant", "content": bad.strip()}]})
        explicit.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good.strip()}],
                         "rejected": [{"role": "assistant", "content": bad.strip()}]})
    return plain, implicit, explicit


def test_trl_jsonl_and_parquet_match_the_hh_loader(shared_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = [r for r in _hh_records(shared_data, 8) if r["chosen"].count("\n\nHuman:") == 1][:4]
    hh = load_source(SourceConfig(_jsonl(tmp_path / "hh.jsonl", raw), "hh")).samples
    plain, implicit, explicit = _trl_rows(raw)
    pq.write_table(pa.Table.from_pylist(explicit), tmp_path / "explicit.parquet")
    loaded = {
        "plain": load_source(SourceConfig(_jsonl(tmp_path / "plain.jsonl", plain), "trl")).samples,
        "implicit": load_source(SourceConfig(_jsonl(tmp_path / "implicit.jsonl", implicit), "trl")).samples,
        "explicit": load_source(SourceConfig(str(tmp_path / "explicit.parquet"), "trl", name="x")).samples,
    }
    for kind, samples in loaded.items():
        assert [(s.context, s.responses, s.ranks) for s in samples] == \
               [(s.context, s.responses, s.ranks) for s in hh], kind
    assert [s.id for s in loaded["explicit"]] == [f"x:{i}" for i in range(1, len(raw) + 1)]


def test_trl_multiturn_implicit_prompt_uses_the_shared_prefix(tmp_path):
    ctx = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "hey"}, {"role": "user", "content": "2+2?"}]
    row = {"chosen": ctx + [{"role": "assistant", "content": "4"}],
           "rejected": ctx + [{"role": "assistant", "content": "5"}]}
    s = load_source(SourceConfig(_jsonl(tmp_path / "t.jsonl", [row]), "trl")).samples[0]
    assert [t.role for t in s.context] == ["system", "user", "assistant", "user"]
    assert s.responses == ["4", "5"] and s.ranks == [1, 2]


def test_rmb_pairwise_real_folder_with_category_map(shared_data):
    cfg = SourceConfig(str(shared_data / "rmb" / "Pairwise_set"), "rmb_pairwise",
                       category_map={"Harmlessness": "harmless", "Helpfulness/Code": "code",
                                     "Helpfulness": "helpful"})
    result = load_source(cfg)
    assert len(result.samples) + len(result.skipped) == 14543
    assert {s.category for s in result.samples} == {"harmless", "code", "helpful"}
    code = [s for s in result.samples if "/Helpfulness/Code/" in s.id]
    assert code and all(s.category == "code" for s in code)  # longest prefix wins
    first = result.samples[0]
    assert first.id == "Pairwise_set/Harmlessness/S1:1" and first.ranks == [1, 2]
    items = json.loads((shared_data / "rmb/Pairwise_set/Harmlessness/S1.json").read_text(encoding="utf-8"))
    assert first.responses == [items[0]["chosen"]["answer"], items[0]["reject"]["answer"]]
    assert len({s.id for s in result.samples}) == len(result.samples)


def test_rmb_bon_real_folder_best_is_rank_one(shared_data):
    result = load_source(SourceConfig(str(shared_data / "rmb" / "BoN_set"), "rmb_bon"))
    assert len(result.samples) + len(result.skipped) == 3786
    for s in result.samples:
        assert s.ranks[0] == 1 and s.ranks[1:] == [2] * (len(s.ranks) - 1) and len(s.ranks) >= 2
    assert result.samples[0].category == "Harmlessness/S1"  # no map: the raw path, set folder dropped


def test_autoj_real_labels_and_ties(shared_data):
    rows = [json.loads(x) for x in (shared_data / "auto-j/testdata_pairwise.jsonl").open(encoding="utf-8")]
    result = load_source(SourceConfig(str(shared_data / "auto-j/testdata_pairwise.jsonl"), "autoj_pairwise"))
    assert len(result.samples) + len(result.skipped) == len(rows) == 1392
    by_line = {int(s.id.rsplit(":", 1)[1]): s for s in result.samples}
    for n, row in enumerate(rows, start=1):
        if n in by_line:
            assert by_line[n].ranks == {0: [1, 2], 1: [2, 1]}[row["label"]]
            assert by_line[n].responses == [row["response 1"], row["response 2"]]
            assert by_line[n].category == row["scenario"]
    ties = [n for n, row in enumerate(rows, start=1) if row["label"] == 2]
    assert ties and [s.line for s in result.skipped if s.reason == NO_PAIR] == ties  # counted, not loaded
    assert f"{len(ties)} x {NO_PAIR!r}" in result.summary()


def test_paper_format_fixture():
    cmap = {"角色扮演": "roleplay", "闲聊": "chat", "主观问答": "subjective_qa", "客观问答": "objective_qa",
            "文本创作": "text_creation"}
    result = load_source(SourceConfig(str(PAPER), "dmoerm_paper", category_map=cmap))
    samples = result.samples
    assert len(samples) == 5 and samples[0].id == "fixtures/paper_format:1"
    assert result.skipped == [Skip(4, None, NO_PAIR, str(PAPER))]  # all ranks tied: no preference
    assert [s.category for s in samples] == ["roleplay", "chat", "objective_qa", "text_creation", "chat"]
    two = samples[1]
    assert [(t.role, t.content) for t in two.context] == [
        ("user", "今天好累啊"), ("assistant", "辛苦啦！发生什么事了吗？"),
        ("user", "加班到十点，老板还不满意")]
    assert samples[0].ranks == [1, 3, 2] and samples[0].pairs() == [(0, 1), (0, 2), (2, 1)]
    assert len(samples[3].context) == 5


def test_canonical_roundtrip_local_gz_and_s3(tmp_path, s3_server):
    samples = load_source(SourceConfig(str(PAPER), "dmoerm_paper")).samples
    samples[0].capability_prefs = {"empathy": [(0, 2)]}
    bucket = s3_server.create_bucket("loaders")
    for target in (tmp_path / "s.jsonl", tmp_path / "s.jsonl.gz", f"s3://{bucket}/canon/s.jsonl"):
        assert write_samples(target, samples) == 5
        back = load_source(SourceConfig(str(target), "dmoerm")).samples
        assert [s.to_json() for s in back] == [s.to_json() for s in samples]


def test_s3_source_matches_local(shared_data, s3_server):
    bucket = s3_server.create_bucket("rmb")
    local = shared_data / "rmb/Pairwise_set/Helpfulness/Chat"
    client = s3_server.client()
    for f in sorted(local.glob("*.json")):
        client.upload_file(str(f), bucket, f"Pairwise_set/Helpfulness/Chat/{f.name}")
    remote = load_source(SourceConfig(f"s3://{bucket}/Pairwise_set/Helpfulness/Chat", "rmb_pairwise"))
    here = load_source(SourceConfig(str(local), "rmb_pairwise"))
    assert remote.samples and [s.to_json() for s in remote.samples] == [s.to_json() for s in here.samples]


def test_limit_counts_loaded_samples(shared_data):
    result = load_source(SourceConfig(str(shared_data / "auto-j/testdata_pairwise.jsonl"), "autoj_pairwise",
                                      limit=5))
    assert isinstance(result, LoadResult) and len(result.samples) == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"format": "csv"}, "format"),
    ({"on_error": "ignore"}, "on_error"),
    ({"limit": 0}, "limit"),
    ({"category": "a", "category_map": {"x": "y"}}, "not both"),
    ({"format": "hh", "category_map": {"x": "y"}}, "no per-record labels"),
    ({"path": ""}, "path"),
    ({"category_map": {"x": 1}}, "category_map"),
])
def test_source_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SourceConfig(**{"path": "x.json", "format": "rmb_pairwise", **kwargs})


def test_sample_is_canonical_type(tmp_path):
    s = load_source(SourceConfig(str(PAPER), "dmoerm_paper", limit=1)).samples[0]
    assert isinstance(s, Sample) and s.source == "fixtures/paper_format"
