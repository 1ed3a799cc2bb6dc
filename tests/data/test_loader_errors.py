"""Malformed input, for every format: DataError names the file, the line (or item / row) and the field;
with on_error="skip" the record is counted in LoadResult.skipped instead."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dmoerm.data import DataError, SourceConfig, load_source

HH_OK = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
TRL_OK = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
MSG = [{"role": "user", "content": "hi", "language": "English"}]
RMB_OK = {"pair_uid": "1", "conversation_input": MSG, "chosen": {"llm_name": "a", "answer": "good"},
          "reject": {"llm_name": "b", "answer": "bad"}, "category_path": "Pairwise_set/Helpfulness/Chat"}
BON_OK = {"bon_uid": "1", "conversation_input": MSG, "bon_best": {"answer": "good"},
          "loser_list": [{"answer": "bad"}, {"answer": "worse"}], "category_path": "BoN_set/Harmlessness/S1"}
AUTOJ_OK = {"scenario": "chitchat", "label": 0, "prompt": "hi", "response 1": "hello", "response 2": "go"}
PAPER_OK = {"src": ["你好"], "tgt": [], "response": ["你好呀", "滚"], "rank": [1, 2], "label": "闲聊"}
CANON_OK = {"id": "c:1", "context": [{"role": "user", "content": "hi"}], "responses": ["a", "b"],
            "ranks": [1, 2], "category": None}

# (format, good record, bad record, field named in the error, extra SourceConfig kwargs)
CASES = [
    ("hh", HH_OK, {"chosen": HH_OK["chosen"]}, "rejected", {}),
    ("hh", HH_OK, {"chosen": 3, "rejected": "x"}, "chosen", {}),
    ("hh", HH_OK, {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: yo\n\nAssistant: b"},
     "rejected", {}),
    ("hh", HH_OK, {"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
                   "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: z"}, "rejected", {}),
    ("hh", HH_OK, {"chosen": "Human: hi\n\nAssistant: a", "rejected": "Human: hi\n\nAssistant: b"},
     "chosen", {}),
    ("trl", TRL_OK, {"chosen": "a", "rejected": "b"}, "prompt", {}),
    ("trl", TRL_OK, {"prompt": "hi", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
     "rejected", {}),
    ("trl", TRL_OK, {"chosen": [{"role": "user", "content": "a"}],
                     "rejected": [{"role": "user", "content": "b"}]},
     "chosen", {}),
    ("trl", TRL_OK, {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].content", {}),
    ("trl", TRL_OK, {"prompt": [{"role": "robot", "content": "x"}],
                     "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].role", {}),
    ("trl", TRL_OK, {"chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "b"}]}, "prompt", {}),
    ("rmb_pairwise", RMB_OK, {**RMB_OK, "reject": {"llm_name": "b"}}, "reject.answer", {}),
    ("rmb_pairwise", RMB_OK, {**RMB_OK, "conversation_input": "hi"}, "conversation_input", {}),
    ("rmb_pairwise", RMB_OK, {**RMB_OK, "category_path": "Pairwise_set/Other/X"}, "category_path",
     {"category_map": {"Helpfulness": "helpful"}}),
    ("rmb_pairwise", RMB_OK, {**RMB_OK, "conversation_input": []}, "conversation_input", {}),
    ("rmb_bon", BON_OK, {**BON_OK, "loser_list": []}, "loser_list", {}),
    ("rmb_bon", BON_OK, {k: v for k, v in BON_OK.items() if k != "bon_best"}, "bon_best", {}),
    ("autoj_pairwise", AUTOJ_OK, {**AUTOJ_OK, "label": 3}, "label", {}),
    ("autoj_pairwise", AUTOJ_OK, {**AUTOJ_OK, "label": "0"}, "label", {}),
    ("autoj_pairwise", AUTOJ_OK, {k: v for k, v in AUTOJ_OK.items() if k != "response 2"}, "response 2", {}),
    ("dmoerm_paper", PAPER_OK, {**PAPER_OK, "tgt": ["多余"]}, "tgt", {}),
    ("dmoerm_paper", PAPER_OK, {**PAPER_OK, "rank": [1, 2, 3]}, "rank", {}),
    ("dmoerm_paper", PAPER_OK, {**PAPER_OK, "response": ["只有一个"], "rank": [1]}, "response", {}),
    ("dmoerm_paper", PAPER_OK, {**PAPER_OK, "rank": [0, 1]}, "rank[0]", {}),
    ("dmoerm_paper", PAPER_OK, {**PAPER_OK, "label": "角色扮演"}, "label",
     {"category_map": {"闲聊": "chat"}}),
    ("dmoerm_paper", PAPER_OK, {**PAPER_OK, "src": "你好"}, "src", {}),
    ("dmoerm", CANON_OK, {k: v for k, v in CANON_OK.items() if k != "ranks"}, "ranks", {}),
    ("dmoerm", CANON_OK, {**CANON_OK, "responses": ["a"], "ranks": [1]}, "responses", {}),
    ("dmoerm", CANON_OK, {**CANON_OK, "ranks": [1, 2, 3]}, "ranks", {}),
]


def _write(tmp_path: Path, fmt: str, records: list) -> tuple[str, str]:
    """Write records as the format's container; return (path, how the 2nd record is located)."""
    if fmt.startswith("rmb_"):
        path = tmp_path / "bad_set.json"
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        return str(path), "bad_set.json: item 2:"
    path = tmp_path / "bad_set.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path), "bad_set.jsonl:2:"


@pytest.mark.parametrize("fmt, good, bad, field, extra", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in
                                                                      enumerate(CASES)])
def test_malformed_record_names_file_line_and_field(tmp_path, fmt, good, bad, field, extra):
    again = {**good, "id": "c:3"} if "id" in good else good  # sample ids are unique within a source
    path, where = _write(tmp_path, fmt, [good, bad, again])
    with pytest.raises(DataError) as err:
        load_source(SourceConfig(path, fmt, **extra))
    assert where in str(err.value) and f"(field {field!r})" in str(err.value)
    assert err.value.field_name == field

    result = load_source(SourceConfig(path, fmt, on_error="skip", **extra))
    assert len(result.samples) == 2 and [(s.line, s.field) for s in result.skipped] == [(2, field)]
    assert "skipped 1" in result.summary() and field in result.summary()


@pytest.mark.parametrize("fmt", ["hh", "trl", "autoj_pairwise", "dmoerm_paper", "dmoerm"])
def test_bad_json_line_names_file_and_line(tmp_path, fmt, caplog):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"chosen": \n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:1: invalid JSON"):
        load_source(SourceConfig(str(path), fmt))
    with caplog.at_level(logging.WARNING, logger="dmoerm.data.loaders"), \
            pytest.raises(DataError, match=r"no usable sample: .*skipped 2 \(.*expected a JSON object"):
        load_source(SourceConfig(str(path), fmt, on_error="skip"))  # nothing usable left: an error, not []
    assert "broken.jsonl:1: invalid JSON" in caplog.text  # every skip is logged
    assert "broken.jsonl:2: expected a JSON object" in caplog.text


@pytest.mark.parametrize("fmt", ["rmb_pairwise", "rmb_bon"])
def test_json_list_files_fail_whole_when_unreadable(tmp_path, fmt):
    (tmp_path / "a.json").write_text('[\n{"pair_uid": 1},\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON"):
        load_source(SourceConfig(str(tmp_path / "a.json"), fmt))
    (tmp_path / "b.json").write_text('{"not": "a list"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.json: expected a JSON list"):
        load_source(SourceConfig(str(tmp_path / "b.json"), fmt, on_error="skip"))


def test_parquet_rows_are_located(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([TRL_OK, {"prompt": "hi", "chosen": "x", "rejected": None}]),
                   tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: row 2: missing required field \(field 'rejected'\)"):
        load_source(SourceConfig(str(tmp_path / "p.parquet"), "trl"))


def test_rmb_folder_item_errors_name_the_inner_file(tmp_path):
    (tmp_path / "Pairwise_set" / "Helpfulness").mkdir(parents=True)
    (tmp_path / "Pairwise_set" / "Helpfulness" / "Chat.json").write_text(json.dumps([RMB_OK, {}]))
    (tmp_path / "Pairwise_set" / "A.json").write_text(json.dumps([RMB_OK]))
    with pytest.raises(DataError, match=r"Helpfulness/Chat\.json: item 2: .*'conversation_input'"):
        load_source(SourceConfig(str(tmp_path / "Pairwise_set"), "rmb_pairwise"))
    result = load_source(SourceConfig(str(tmp_path / "Pairwise_set"), "rmb_pairwise", on_error="skip"))
    assert [s.id for s in result.samples] == ["Pairwise_set/A:1", "Pairwise_set/Helpfulness/Chat:1"]
    assert result.skipped[0].path.endswith("Chat.json")
