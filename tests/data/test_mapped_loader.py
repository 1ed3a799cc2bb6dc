"""format: mapped (issue 8, item 12): any JSON / JSON-array / JSONL / CSV / Parquet file through a field
map, from a config or the command line; every format listed with its fields in --help."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from dmoerm.cli import build_parser
from dmoerm.config import load_config
from dmoerm.data import FORMATS, DataError, SourceConfig, formats_help, load_source, parse_map
from dmoerm.data.loaders import NO_PAIR

PAIRS = [{"prompt": "hi", "chosen": "hello", "rejected": "go away", "meta": {"uid": "u1", "topic": "chat"}},
         {"prompt": "2+2?", "chosen": "4", "rejected": "5", "meta": {"uid": "u2", "topic": "math"}}]
PAIR_MAP = ["context=prompt", "chosen=chosen", "rejected=rejected"]


def _canonical(samples) -> list[tuple]:
    return [([(t.role, t.content) for t in s.context], s.responses, s.ranks) for s in samples]


def _write(path: Path, rows: list[dict]) -> str:
    """rows in the container the suffix names."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)
    if name.endswith((".csv", ".tsv")):
        flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0]), delimiter="\t" if name.endswith(".tsv") else ",")
            w.writeheader()
            w.writerows(flat)
        return str(path)
    text = json.dumps(rows, indent=2) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


@pytest.mark.parametrize("name", ["p.json", "p.jsonl", "p.ndjson", "p.jsonl.gz", "p.json.gz", "p.csv", "p.tsv",
                                  "p.parquet"])
def test_every_container_gives_the_same_samples(tmp_path, name):
    rows = [{k: v for k, v in r.items() if k != "meta"} for r in PAIRS] if "sv" in name else PAIRS
    result = load_source(SourceConfig(_write(tmp_path / name, rows), "mapped", map=parse_map(PAIR_MAP)))
    assert _canonical(result.samples) == [([("user", "hi")], ["hello", "go away"], [1, 2]),
                                          ([("user", "2+2?")], ["4", "5"], [1, 2])]
    lines = (2, 3) if name.endswith((".csv", ".tsv")) else (1, 2)  # CSV: the record's line, the header is 1
    assert [s.id for s in result.samples] == [f"{tmp_path.name}/p:{n}" for n in lines]


def test_a_json_array_in_a_jsonl_file_is_read_as_the_array_it_is(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_text(json.dumps(PAIRS, indent=1), encoding="utf-8")
    assert len(load_source(SourceConfig(str(path), "mapped", map=parse_map(PAIR_MAP))).samples) == 2


def test_nested_keys_ids_categories_and_records_inside_an_object(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": {"rows": PAIRS}}), encoding="utf-8")
    cfg = SourceConfig(str(path), "mapped", map=parse_map([*PAIR_MAP, "id=meta.uid", "category=meta.topic",
                                                           "records=data.rows"]),
                       category_map={"chat": "chitchat", "math": "qa"})
    samples = load_source(cfg).samples
    assert [(s.id, s.category) for s in samples] == [("u1", "chitchat"), ("u2", "qa")]
    with pytest.raises(DataError, match=r"expected a JSON list of records, got dict .*records="):
        load_source(SourceConfig(str(path), "mapped", map=parse_map(PAIR_MAP)))


def test_ranked_and_scored_lists(tmp_path):
    rows = [{"q": "pick", "outs": [{"text": "ok"}, {"text": "best"}, {"text": "bad"}], "rank": [2, 1, 3],
             "score": [0.5, 1.5, -1]}]
    path = _write(tmp_path / "r.jsonl", rows)
    ranked = load_source(SourceConfig(path, "mapped", map=parse_map(["context=q,responses=outs.*.text,ranks=rank"])))
    scored = load_source(SourceConfig(path, "mapped", map=parse_map(["context=q,responses=outs.*.text,scores=score"])))
    assert ranked.samples[0].responses == ["ok", "best", "bad"] and ranked.samples[0].ranks == [2, 1, 3]
    assert scored.samples[0].ranks == [2, 1, 3]  # higher score = better = smaller rank


def test_labelled_pairs_with_stated_values_and_ties(tmp_path):
    rows = [{"q": "a?", "a": "x", "b": "y", "winner": "model_b"}, {"q": "b?", "a": "x", "b": "y", "winner": "tie"},
            {"q": "c?", "a": "x", "b": "y", "winner": "tie (bothbad)"}, {"q": "d?", "a": "x", "b": "y",
                                                                         "winner": "model_a"}]
    path = _write(tmp_path / "arena.jsonl", rows)
    field_map = parse_map(["context=q,response_a=a,response_b=b,label=winner,"
                           "label_values=a:model_a,b:model_b,tie:tie|tie (bothbad)"])
    result = load_source(SourceConfig(path, "mapped", map=field_map))
    assert [s.ranks for s in result.samples] == [[2, 1], [1, 2]]
    assert [(s.line, s.reason) for s in result.skipped] == [(2, NO_PAIR), (3, NO_PAIR)]
    rows.append({"q": "e?", "a": "x", "b": "y", "winner": "both"})
    with pytest.raises(DataError, match=r"arena\.jsonl:5: value 'both' is not among the stated label_values "
                                        r".*\(field 'winner'\)"):
        load_source(SourceConfig(_write(tmp_path / "arena.jsonl", rows), "mapped", map=field_map))


def test_context_as_messages_turn_strings_joined_fields_and_a_system_prompt(tmp_path):
    rows = [{"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}, {"from": "human",
                                                                                         "value": "joke?"}],
             "turns": ["hi", "hey", "joke?"], "instruction": "Rewrite.", "input": "A b.", "sys": "be kind",
             "good": [{"role": "assistant", "content": "knock knock"}], "bad": "no"}]
    path = _write(tmp_path / "c.json", rows)
    want = [("user", "hi"), ("assistant", "hey"), ("user", "joke?")]
    for context in ("conv", "turns"):
        s = load_source(SourceConfig(path, "mapped", map=parse_map([f"context={context}", "chosen=good",
                                                                    "rejected=bad"]))).samples[0]
        assert [(t.role, t.content) for t in s.context] == want and s.responses == ["knock knock", "no"]
    s = load_source(SourceConfig(path, "mapped", map=parse_map(["context=instruction+input", "system=sys",
                                                                "chosen=good", "rejected=bad"]))).samples[0]
    assert [(t.role, t.content) for t in s.context] == [("system", "be kind"), ("user", "Rewrite.\n\nA b.")]


def test_record_errors_name_the_files_field(tmp_path):
    rows = [PAIRS[0], {"prompt": "x", "chosen": {"text": "a"}, "rejected": "b"}, {"prompt": "y", "chosen": "a"}]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a response string, got dict .*FIELD\.text"):
        load_source(SourceConfig(path, "mapped", map=parse_map(PAIR_MAP)))
    result = load_source(SourceConfig(path, "mapped", map=parse_map(PAIR_MAP), on_error="skip"))
    assert [(s.line, s.field) for s in result.skipped] == [(2, "chosen"), (3, "rejected")]
    dup = _write(tmp_path / "dup.csv", [{"id": "7", **PAIRS[0]}, {"id": "7", **PAIRS[1]}])
    with pytest.raises(DataError, match=r"dup\.csv:3: duplicate sample id '7' \(first at line 2\)"):
        load_source(SourceConfig(dup, "mapped", map=parse_map([*PAIR_MAP, "id=id"])))


@pytest.mark.parametrize("items, match", [
    (["context=p", "chosen=c"], "needs chosen, rejected"),
    (["chosen=c", "rejected=r"], "context=FIELD is required"),
    (["context=p", "chosen=c", "rejected=r", "ranks=k"], "exactly one of"),
    (["context=p", "responses=r", "ranks=k", "scores=s"], "exactly one of"),
    (["context=p", "prompt=c"], "unknown key"),
    (["context=p", "response_a=a", "response_b=b", "label=l"], "label_values"),
    (["context=p,response_a=a,response_b=b,label=l,label_values=a:1,tie:0"], "means 'b' is better"),
    (["context=p,response_a=a,response_b=b,label=l,label_values=a:1,b:1"], "stated for two outcomes"),
    (["context"], "is not KEY=FIELD"),
    (["context=p", "context=q"], "given twice"),
])
def test_bad_maps_say_what_is_wrong(items, match):
    with pytest.raises(ValueError, match=match):
        parse_map(items)


def test_parse_map_takes_separate_and_comma_separated_items():
    one = parse_map(["context=instruction+input,response_a=response 1,response_b=response 2,label=annotator1,"
                     "label_values=a:1,b:2,tie:0"])
    assert one == {"context": "instruction+input", "response_a": "response 1", "response_b": "response 2",
                   "label": "annotator1", "label_values": "a:1,b:2,tie:0"}
    assert parse_map(PAIR_MAP) == {"context": "prompt", "chosen": "chosen", "rejected": "rejected"}


def test_the_map_in_a_config_and_its_validation(tmp_path):
    path = _write(tmp_path / "pairs.csv", [{k: v for k, v in r.items() if k != "meta"} for r in PAIRS])
    raw = {"taxonomy": [{"name": "chat", "capabilities": ["empathy"]}],
           "data": {"sources": [{"path": path, "format": "mapped", "category": "chat",
                                 "map": {"context": "prompt", "chosen": "chosen", "rejected": "rejected"}}]},
           "labels": {"source": "dataset", "datasets": {"empathy": [{"path": path, "format": "hh"}]}}}
    src = load_config(data=raw).data.sources[0]
    assert len(load_source(src).samples) == 2
    raw["data"]["sources"][0]["map"] = {"context": "prompt"}
    with pytest.raises(ValueError, match=r"data\.sources\[0\].*exactly one of"):
        load_config(data=raw)
    with pytest.raises(ValueError, match="only read by format 'mapped'"):
        SourceConfig(path, "hh", map={"context": "prompt"})
    with pytest.raises(ValueError, match="needs a field map"):
        SourceConfig(path, "mapped")


def test_unknown_file_types_and_missing_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.txt: format 'mapped' tells the file type by its name"):
        load_source(SourceConfig(str(tmp_path / "x.txt"), "mapped", map=parse_map(PAIR_MAP)))
    with pytest.raises(FileNotFoundError):
        load_source(SourceConfig(str(tmp_path / "nope.json"), "mapped", map=parse_map(PAIR_MAP)))


def test_real_benchmarks_in_their_own_layouts(shared_data):
    autoj = str(shared_data / "auto-j/testdata_pairwise.jsonl")
    mapped = load_source(SourceConfig(autoj, "mapped", map=parse_map([
        "context=prompt,response_a=response 1,response_b=response 2,label=label,label_values=a:0,b:1,tie:2,"
        "category=scenario"])))
    native = load_source(SourceConfig(autoj, "autoj_pairwise"))
    assert [s.to_json() for s in mapped.samples] == [s.to_json() for s in native.samples]
    assert mapped.skipped == native.skipped
    pandalm = SourceConfig(str(shared_data / "pandalm/testset-v1.json"), "mapped", on_error="skip", map=parse_map([
        "context=instruction+input", "response_a=response1", "response_b=response2", "label=annotator1",
        "label_values=a:1,b:2,tie:0", "id=idx", "category=motivation_app"]))
    result = load_source(pandalm)
    assert len(result.samples) + len(result.skipped) == 999 and result.samples[0].id == "0"
    assert {s.field for s in result.skipped if s.reason != NO_PAIR} == {"response1", "response2"}  # booleans
    with pytest.raises(DataError, match=r"testset-v1\.json: item \d+: expected a response string, got bool"):
        load_source(SourceConfig(pandalm.path, "mapped", map=pandalm.map))


def test_help_lists_every_format_with_its_fields():
    text = formats_help()
    for name in FORMATS:
        assert f"\n  {name} " in text
    for key in ("context=FIELD", "chosen=FIELD", "ranks=FIELD", "scores=FIELD", "label_values=", "records=FIELD"):
        assert key in text
    parser = build_parser()
    for command in ("evaluate", "score"):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert formats_help() in sub.format_help()
    args = parser.parse_args(["evaluate", "--bundle", "b", "--data", "d.csv", "--map", "context=q", "chosen=c",
                              "rejected=r"])
    assert args.format == "mapped" and args.map == ["context=q", "chosen=c", "rejected=r"]
    args = parser.parse_args(["score", "--bundle", "b", "--input", "d.csv", "--map", "context=q,chosen=c,rejected=r"])
    assert args.format == "mapped"
    assert parser.parse_args(["score", "--bundle", "b", "--input", "d.jsonl"]).format == "conversations"


def test_the_cli_reads_a_mapped_file_before_loading_the_bundle(tmp_path, capsys):
    from dmoerm.cli import main

    path = _write(tmp_path / "bench.csv", [{"q": "hi", "good": "hello", "bad": "hello"}])  # identical pair only
    code = main(["evaluate", "--bundle", str(tmp_path / "no-bundle"), "--data", path, "--map", "context=q",
                 "chosen=good", "rejected=bad"])
    assert code == 2 and "bench.csv: no usable sample" in capsys.readouterr().err


def test_the_readme_mirrors_the_formats():
    from dmoerm.data.mapped import KEYS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Data formats"):]
    section = section[: section.index("\n## ", 1)]
    for name in (*FORMATS, "conversations"):
        assert f"| `{name}` |" in section, name
    for key in KEYS:
        assert f"`{key}`" in section, key
