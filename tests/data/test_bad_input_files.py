"""Bad input files (issue 8, item 8): each is a DataError naming file, line and field, or a counted,
reported skip; never a bare UnicodeDecodeError / EOFError / AttributeError, never an empty table, never
two samples under one id."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dmoerm.config import load_config
from dmoerm.data import DataError, SourceConfig, load_source, load_sources
from dmoerm.data.loaders import NO_PAIR
from dmoerm.stages.data import load_data
from dmoerm.stages.labels import label_capabilities

HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
CTX = [{"role": "user", "content": "hi"}]


def _canon(i: int, **extra) -> dict:
    return {"id": f"c:{i}", "context": [{"role": "user", "content": f"question {i}"}], "responses": ["a", "b"],
            "ranks": [1, 2], **extra}


def _lines(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("gz", [False, True])
def test_a_non_utf8_line_is_that_records_error_or_a_counted_skip(tmp_path, gz):
    data = (json.dumps(HH) + "\n").encode() + b'{"chosen": "caf\xe9"}\n' + (json.dumps(HH) + "\n").encode()
    path = tmp_path / ("latin.jsonl.gz" if gz else "latin.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"latin\.jsonl(\.gz)?:2: not valid UTF-8: byte b'\\xe9'"):
        load_source(SourceConfig(str(path), "hh"))
    result = load_source(SourceConfig(str(path), "hh", on_error="skip"))
    assert len(result.samples) == 2 and [(s.line, s.field) for s in result.skipped] == [(2, None)]
    assert "not valid UTF-8" in result.summary()


def test_a_non_utf8_json_array_names_the_line(tmp_path):
    rmb = {"conversation_input": CTX, "chosen": {"answer": "good"}, "reject": {"answer": "bad"}}
    (tmp_path / "a.json").write_bytes(b"[\n" + json.dumps(rmb).encode() + b',\n{"x": "\xff"}\n]')
    for on_error in ("raise", "skip"):  # one document: unreadable as a whole
        with pytest.raises(DataError, match=r"a\.json:3: not valid UTF-8"):
            load_source(SourceConfig(str(tmp_path / "a.json"), "rmb_pairwise", on_error=on_error))


def test_a_truncated_gz_is_an_error_even_with_skip(tmp_path):
    whole = gzip.compress("".join(json.dumps(HH) + "\n" for _ in range(200)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"cut\.jsonl\.gz: truncated or corrupt gzip file"):
            load_source(SourceConfig(str(path), "hh", on_error=on_error))


@pytest.mark.parametrize("prefs, field", [
    ([["empathy", 0, 1]], "capability_prefs"),
    ({"empathy": [0, 1]}, "capability_prefs.empathy[0]"),
    ({"empathy": "0>1"}, "capability_prefs.empathy"),
    ({"empathy": [[0, 5]]}, "capability_prefs"),
])
def test_malformed_capability_prefs_name_the_field(tmp_path, prefs, field):
    path = _lines(tmp_path / "c.jsonl", [_canon(1), _canon(2, capability_prefs=prefs), _canon(3)])
    with pytest.raises(DataError, match=r"c\.jsonl:2: ") as err:
        load_source(SourceConfig(path, "dmoerm"))
    assert err.value.field_name == field
    result = load_source(SourceConfig(path, "dmoerm", on_error="skip"))
    assert [s.id for s in result.samples] == ["c:1", "c:3"] and result.skipped[0].field == field


def test_tied_samples_are_counted_skips_and_an_all_tied_source_is_an_error(tmp_path):
    mixed = _lines(tmp_path / "mixed.jsonl", [_canon(1), _canon(2, ranks=[1, 1]), _canon(3)])
    result = load_source(SourceConfig(mixed, "dmoerm"))  # a tie is no malformed input: skipped when raising too
    assert [s.id for s in result.samples] == ["c:1", "c:3"]
    assert [(s.line, s.reason) for s in result.skipped] == [(2, NO_PAIR)]
    assert f"1 x {NO_PAIR!r}" in result.summary()
    tied = _lines(tmp_path / "tied.jsonl", [_canon(i, ranks=[2, 2]) for i in range(3)])
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"tied\.jsonl: no usable sample: .*skipped 3 \(3 x 'no preference pair"):
            load_source(SourceConfig(tied, "dmoerm", on_error=on_error))
    autoj = _lines(tmp_path / "autoj.jsonl", [{"prompt": "p", "response 1": "a", "response 2": "b", "label": 2}])
    with pytest.raises(DataError, match="no usable sample"):
        load_source(SourceConfig(autoj, "autoj_pairwise"))


def test_a_tied_sample_with_capability_preferences_is_kept(tmp_path):
    path = _lines(tmp_path / "caps.jsonl", [_canon(1, ranks=[1, 1], capability_prefs={"empathy": [[1, 0]]})])
    (s,) = load_source(SourceConfig(path, "dmoerm")).samples
    assert s.capability_prefs == {"empathy": [(1, 0)]} and s.pairs() == []


def test_an_empty_source_is_an_error_and_an_empty_stage_file_an_empty_split(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    src = SourceConfig(str(tmp_path / "empty.jsonl"), "dmoerm")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records found"):
        load_sources([src])  # a config's sources
    assert load_source(src).samples == []  # the stage store reads its (maybe empty) splits this way


def test_a_duplicate_id_in_one_source_names_both_lines(tmp_path):
    path = _lines(tmp_path / "dup.jsonl", [_canon(1), _canon(2), _canon(1, responses=["x", "y"])])
    with pytest.raises(DataError, match=r"dup\.jsonl:3: duplicate sample id 'c:1' \(first at line 1\)") as err:
        load_source(SourceConfig(path, "dmoerm"))
    assert err.value.field_name == "id"
    result = load_source(SourceConfig(path, "dmoerm", on_error="skip"))
    assert [s.id for s in result.samples] == ["c:1", "c:2"] and [s.line for s in result.skipped] == [3]


def _two_sources(tmp_path: Path) -> list[dict]:
    """Two files whose default source names, and so sample ids, collide: a/x/t.jsonl and b/x/t.jsonl."""
    out = []
    for top, prompt in (("a", "hi"), ("b", "yo")):
        (tmp_path / top / "x").mkdir(parents=True)
        row = {k: v.replace("hi", prompt) for k, v in HH.items()}
        out.append({"path": _lines(tmp_path / top / "x" / "t.jsonl", [row]), "format": "hh", "category": "chat"})
    return out


def test_a_duplicate_id_across_sources_names_both_files(tmp_path):
    srcs = _two_sources(tmp_path)
    with pytest.raises(DataError, match=r"sample id 'x/t:1' is in two sources, .*a/x/t\.jsonl and .*b/x/t\.jsonl"):
        load_sources([SourceConfig(**s) for s in srcs])
    raw = {"taxonomy": [{"name": "chat", "capabilities": ["empathy"]}],
           "data": {"sources": srcs}, "labels": {"source": "dataset", "datasets": {"empathy": srcs}},
           "platform": {"storage_uri": str(tmp_path / "store")}}
    with pytest.raises(DataError, match="is in two sources"):
        load_data(load_config(data=raw))  # the data stage
    named = [{**srcs[0], "name": "first"}, {**srcs[1], "name": "second"}]
    cfg = load_config(data={**raw, "data": {"sources": named}})
    samples, report = load_data(cfg)
    assert sorted(s.id for s in samples) == ["first:1", "second:1"] and report["samples"] == 2
    empty = {"phase1": samples, "phase3": [], "val": [], "test": []}
    with pytest.raises(DataError, match="is in two sources"):
        label_capabilities(cfg, empty)  # the label sources of one capability


@pytest.mark.parametrize("fmt", ["hh", "trl", "autoj_pairwise", "dmoerm_paper", "dmoerm"])
def test_a_json_array_given_to_a_json_lines_format_says_so(tmp_path, fmt):
    (tmp_path / "arr.jsonl").write_text(json.dumps([HH, HH], indent=2), encoding="utf-8")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=rf"arr\.jsonl:1: format '{fmt}' reads JSON lines .* is a JSON array"):
            load_source(SourceConfig(str(tmp_path / "arr.jsonl"), fmt, on_error=on_error))
    (tmp_path / "one.jsonl").write_text(json.dumps([HH, HH]), encoding="utf-8")  # on one line
    with pytest.raises(DataError, match="is a JSON array"):
        load_source(SourceConfig(str(tmp_path / "one.jsonl"), fmt))
