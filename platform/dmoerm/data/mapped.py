"""``format: mapped``: any pairwise or ranked benchmark, in its own layout, through a field map.

The file is JSON (an array of objects, or the array at ``records`` inside an object), JSON lines, CSV/TSV
(a header row; list-valued cells as JSON) or Parquet, optionally ``.gz``, chosen by its name. The map
says where each canonical field is (``FIELD`` is the file's key; dotted for nested keys, digits index
lists, ``*`` maps over a list). :data:`MAP_HELP` is the reference; :func:`formats_help` lists every
format of the loaders with the fields it needs (the CLI's ``--help`` and the README show it).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import textwrap
from collections.abc import Iterator
from typing import Any

from dmoerm.data import readers
from dmoerm.data.loaders import FORMATS, SourceConfig, _category, _RecordError, _sample
from dmoerm.data.records import DataError, Sample, Turn

SHAPES: dict[str, tuple[str, ...]] = {
    "pairwise": ("chosen", "rejected"),
    "ranked": ("responses", "ranks"),
    "scored": ("responses", "scores"),
    "labelled": ("response_a", "response_b", "label", "label_values"),
}
"""The ways a record can state its preference: exactly one must be mapped."""
OPTIONAL = ("system", "id", "category", "records")
KEYS: tuple[str, ...] = ("context", *dict.fromkeys(k for shape in SHAPES.values() for k in shape), *OPTIONAL)
ROLE_ALIASES = {"human": "user", "user": "user", "prompter": "user", "gpt": "assistant", "bot": "assistant",
                "model": "assistant", "assistant": "assistant", "chatbot": "assistant", "system": "system"}
SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")

MAP_HELP = """\
  mapped field map: KEY=FIELD, FIELD the file's key (dotted for nested keys, digits index lists, * maps
  over a list: losers.*.text); on the command line --map KEY=FIELD ... (or one comma-separated item),
  in a config map: {KEY: FIELD, ...}
    context=FIELD       required: a prompt string, a list of {role, content} (or {from, value}) messages,
                        or a list of strings (user, assistant, user, ... turns); FIELD+FIELD joins several
                        string fields with a blank line (e.g. context=instruction+input)
    then one of:
    chosen=FIELD rejected=FIELD                 the preferred and the dispreferred response
    responses=FIELD ranks=FIELD                 a list of responses and their ranks (1 = best, ties share)
    responses=FIELD scores=FIELD                a list of responses and their scores (higher = better)
    response_a=FIELD response_b=FIELD label=FIELD label_values=a:V,b:V[,tie:V]
                                                two responses and the label's values meaning "a is better",
                                                "b is better" and a tie (several values: V1|V2)
    optional: system=FIELD (a system prompt), id=FIELD (default <name>:<line>), category=FIELD (with
    category_map in a config), records=FIELD (the list of records inside a JSON object)
    a response is a string, or a message list whose last (assistant) message is taken
  e.g. --format mapped --map context=prompt chosen=chosen rejected=rejected
       --format mapped --map context=instruction+input response_a=response1 response_b=response2 \\
            label=annotator1 label_values=a:1,b:2,tie:0"""

_FORMAT_LINES = {
    "dmoerm": "canonical JSON lines: context [{role, content}], responses [str], ranks [int] (1 = best); "
              "optional id, category, capability_prefs {capability: [[better, worse], ...]}, source",
    "hh": "Anthropic HH JSON lines: chosen, rejected (full '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts "
          "that share the prompt)",
    "trl": "TRL preference JSON lines or Parquet: prompt, chosen, rejected (strings), or chosen and rejected "
           "message lists ending in an assistant message (prompt optional)",
    "rmb_pairwise": "RMB JSON arrays (a file or a folder of .json): conversation_input [{role, content}], "
                    "chosen.answer, reject.answer; optional category_path",
    "rmb_bon": "RMB best-of-N JSON arrays: conversation_input, bon_best.answer, loser_list [{answer}]; "
               "optional category_path",
    "autoj_pairwise": "Auto-J JSON lines: prompt, 'response 1', 'response 2', label (0: response 1 better, "
                      "1: response 2 better, 2: tie); optional scenario",
    "dmoerm_paper": "the paper's JSON lines: src [user turns], tgt [assistant turns, one fewer], response "
                    "[str], rank [int] (1 = best); optional label",
    "mapped": "any .json (array) / .jsonl / .ndjson / .csv / .tsv / .parquet file (optionally .gz) through a "
              "field map: see below",
}


def formats_help() -> str:
    """Every loader format with the fields it needs (the CLI's help epilog; mirrored in the README)."""
    missing = set(FORMATS) - set(_FORMAT_LINES)
    if missing:  # a format added to the loaders must be documented here
        raise RuntimeError(f"formats_help: no description for {sorted(missing)}")
    lines = ["input formats (--format; data.sources[].format in a config):"]
    lines += [textwrap.fill(_FORMAT_LINES[name], 110, initial_indent=f"  {name:<15} ", subsequent_indent=" " * 18)
              for name in FORMATS]
    lines += ["  Ties carry no preference: a record whose ranks are all tied is skipped and counted.", MAP_HELP]
    return "\n".join(lines)


def parse_label_values(text: str) -> dict[str, list[int]]:
    """``"a:V|V2,b:V,tie:V"`` -> raw label value -> ranks of (response_a, response_b)."""
    ranks = {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}
    out: dict[str, list[int]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        side, sep, values = part.partition(":")
        side = side.strip()
        if not sep or side not in ranks or not values.strip():
            raise ValueError(f"map label_values: {part!r} must be a:VALUE, b:VALUE or tie:VALUE "
                             "(several values: V1|V2), e.g. label_values=a:model_a,b:model_b,tie:tie")
        for value in (v.strip() for v in values.split("|")):
            if out.setdefault(value, ranks[side]) != ranks[side]:
                raise ValueError(f"map label_values: {value!r} is stated for two outcomes")
    for side in ("a", "b"):
        if ranks[side] not in out.values():
            raise ValueError(f"map label_values: say which label value means {side!r} is better "
                             f"({side}:VALUE), got {text!r}")
    return out


def check_map(mapping: dict[str, str]) -> dict[str, str]:
    """The map, checked: known keys, a context, exactly one preference shape (see :data:`MAP_HELP`)."""
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError("format 'mapped' needs a field map (map: {context: FIELD, chosen: FIELD, rejected: "
                         "FIELD} in a config, --map context=FIELD ... on the command line)\n" + MAP_HELP)
    unknown = sorted(set(mapping) - set(KEYS))
    if unknown:
        raise ValueError(f"map: unknown key(s) {unknown}; known: {', '.join(KEYS)}")
    for key, value in mapping.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"map.{key}: expected the name of a field, got {value!r}")
    if "context" not in mapping:
        raise ValueError("map: context=FIELD is required (the prompt or the conversation before the responses)")
    given = [name for name, keys in SHAPES.items() if any(k in mapping for k in keys if k != "responses")]
    if len(given) != 1:
        raise ValueError("map: give exactly one of chosen+rejected, responses+ranks, responses+scores or "
                         f"response_a+response_b+label+label_values (got {sorted(mapping)})")
    need = [k for k in SHAPES[given[0]] if k not in mapping]
    if need or "responses" in mapping and given[0] not in ("ranked", "scored"):
        raise ValueError(f"map: the {given[0]} shape needs {', '.join(SHAPES[given[0]])}; missing "
                         f"{need or ['nothing, but responses belongs to ranks or scores']}")
    if "label_values" in mapping:
        parse_label_values(mapping["label_values"])
    return dict(mapping)


def parse_map(items: list[str]) -> dict[str, str]:
    """``--map`` items (``KEY=FIELD``, several per item when comma-separated) -> a checked map. A comma
    starts a new item only before ``KEY=`` for a known KEY, so label_values=a:x,b:y stays whole."""
    mapping: dict[str, str] = {}
    starts = re.compile(rf"^\s*({'|'.join(KEYS)})\s*=")
    for item in items:
        parts: list[str] = []
        for seg in item.split(","):
            if parts and not starts.match(seg):
                parts[-1] += "," + seg
            else:
                parts.append(seg)
        for part in parts:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"--map: {part!r} is not KEY=FIELD (known keys: {', '.join(KEYS)})")
            if key in mapping:
                raise ValueError(f"--map: {key} is given twice")
            mapping[key] = value.strip()
    return check_map(mapping)


# ---------------------------------------------------------------- reading

def _kind(uri: str) -> str:
    name = re.sub(r"\.gz$", "", uri.lower())
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataError(f"format 'mapped' tells the file type by its name, and reads {', '.join(SUFFIXES)} "
                    "(optionally .gz)", path=uri)


def _starts_with_bracket(uri: str) -> bool:
    with readers.open_binary(uri) as f:
        try:
            head = f.read(4096)
        except readers.GZIP_ERRORS as err:
            raise DataError(f"truncated or corrupt gzip file ({err})", path=uri) from None
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def read_records(uri: str, mapping: dict[str, str]) -> Iterator[readers.Record]:
    """The file's records, by its type (a JSON array in a .jsonl file is read as the array it is)."""
    kind, records = _kind(uri), mapping.get("records")
    if records and kind != ".json":
        raise DataError(f"map records={records} reads the list inside a JSON document; this is a {kind} file",
                        path=uri, field_name="records")
    if kind == ".json" or kind in (".jsonl", ".ndjson") and _starts_with_bracket(uri):
        return readers.read_json(uri, records)
    if kind in (".jsonl", ".ndjson"):
        return readers.read_jsonl(uri, "mapped")
    if kind == ".parquet":
        return readers.read_parquet(uri)
    return _csv_lists(readers.read_csv(uri, "\t" if kind == ".tsv" else ","), mapping)


def _csv_lists(records: Iterator[readers.Record], mapping: dict[str, str]) -> Iterator[readers.Record]:
    """CSV cells are text: a list-valued field (context messages, responses, ranks, scores) is JSON in its
    cell, e.g. ``["good", "bad"]``; a context cell that is not a JSON list stays the prompt string."""
    fields = [mapping[k] for k in ("context", "responses", "ranks", "scores") if k in mapping]
    for n, unit, row in records:
        if isinstance(row, dict):
            for name in fields:
                cell = row.get(name)
                if isinstance(cell, str) and cell.lstrip().startswith("["):
                    with contextlib.suppress(json.JSONDecodeError):
                        row[name] = json.loads(cell)
        yield n, unit, row


# ---------------------------------------------------------------- one record -> Sample

def _value(obj: dict, path: str, required: bool = True) -> Any:
    try:
        value = readers.resolve_path(obj, path)
    except KeyError as err:
        if not required:
            return None
        step = f" (no {err.args[0]!r})" if err.args[0] != path else ""
        raise _RecordError(path, f"missing required field{step}") from None
    if value is None and required:
        raise _RecordError(path, "missing required field")
    return value


def _turns(value: Any, path: str) -> list[Turn]:
    if isinstance(value, str):
        return [Turn("user", value)]
    if not isinstance(value, list):
        raise _RecordError(path, f"expected a prompt string or a list of messages, got {type(value).__name__}")
    turns = []
    for i, msg in enumerate(value):
        if isinstance(msg, str):
            turns.append(Turn("user" if i % 2 == 0 else "assistant", msg))
            continue
        if not isinstance(msg, dict):
            raise _RecordError(f"{path}.{i}", f"expected a message object or string, got {type(msg).__name__}")
        role, content = msg.get("role", msg.get("from")), msg.get("content", msg.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise _RecordError(f"{path}.{i}.role", f"expected one of {sorted(ROLE_ALIASES)}, got {role!r}")
        if not isinstance(content, str):
            raise _RecordError(f"{path}.{i}.content", f"expected str, got {type(content).__name__}")
        turns.append(Turn(ROLE_ALIASES[role.lower()], content))  # type: ignore[arg-type]
    return turns


def _context(obj: dict, mapping: dict[str, str]) -> list[Turn]:
    path = mapping["context"]
    parts = path.split("+") if "+" in path and not _has(obj, path) else [path]
    if len(parts) == 1:
        turns = _turns(_value(obj, path), path)
    else:
        texts = []
        for part in parts:
            text = _value(obj, part.strip())
            if not isinstance(text, str):
                raise _RecordError(part.strip(), f"expected str to join, got {type(text).__name__}")
            texts.append(text.strip())
        turns = [Turn("user", "\n\n".join(t for t in texts if t))]
    if "system" in mapping:
        system = _value(obj, mapping["system"], required=False)
        if system is not None and not isinstance(system, str):
            raise _RecordError(mapping["system"], f"expected str, got {type(system).__name__}")
        if system and system.strip():
            turns = [Turn("system", system), *turns]
    if not any(t.content.strip() for t in turns if t.role != "system"):
        raise _RecordError(path, "the conversation context is empty")
    return turns


def _has(obj: dict, path: str) -> bool:
    try:
        readers.resolve_path(obj, path)
    except KeyError:
        return False
    return True


def _response(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        last = _turns(value, path)[-1]
        if last.role != "assistant":
            raise _RecordError(path, "a message-list response must end with an assistant message")
        return last.content
    hint = " (map a nested field with a dot, e.g. FIELD.text)" if isinstance(value, dict) else ""
    raise _RecordError(path, f"expected a response string, got {type(value).__name__}{hint}")


def _number_list(value: Any, path: str, kind: str) -> list:
    if not isinstance(value, list):
        raise _RecordError(path, f"expected a list of {kind}, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = float(v) if kind == "scores" else int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or kind == "ranks" and v != int(v):
            raise _RecordError(f"{path}.{i}", f"expected {'a number' if kind == 'scores' else 'an integer'}, "
                                              f"got {v!r}")
        out.append(int(v) if kind == "ranks" else float(v))
    return out


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_mapped(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    """One record through ``cfg.map`` (checked by :func:`check_map`)."""
    m = cfg.map
    context = _context(obj, m)
    if "chosen" in m:
        responses, ranks = [_response(_value(obj, m["chosen"]), m["chosen"]),
                            _response(_value(obj, m["rejected"]), m["rejected"])], [1, 2]
        rank_field = m["rejected"]
    elif "response_a" in m:
        responses = [_response(_value(obj, m["response_a"]), m["response_a"]),
                     _response(_value(obj, m["response_b"]), m["response_b"])]
        raw = _label_key(_value(obj, m["label"]))
        stated = parse_label_values(m["label_values"])
        if raw not in stated:
            raise _RecordError(m["label"], f"value {raw!r} is not among the stated label_values "
                                           f"({m['label_values']})")
        ranks, rank_field = stated[raw], m["label"]
    else:
        listed = _value(obj, m["responses"])
        if not isinstance(listed, list) or len(listed) < 2:
            got = f"{len(listed)} entries" if isinstance(listed, list) else type(listed).__name__
            raise _RecordError(m["responses"], f"expected a list of at least 2 responses, got {got}")
        responses = [_response(r, f"{m['responses']}.{i}") for i, r in enumerate(listed)]
        rank_field = m.get("ranks") or m["scores"]
        if "ranks" in m:
            ranks = _number_list(_value(obj, m["ranks"]), m["ranks"], "ranks")
        else:
            scores = _number_list(_value(obj, m["scores"]), m["scores"], "scores")
            distinct = sorted(set(scores), reverse=True)
            ranks = [distinct.index(s) + 1 for s in scores]  # higher score = better = smaller rank
    if "id" in m:
        raw_id = _value(obj, m["id"])
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            raise _RecordError(m["id"], f"expected a non-empty string or integer id, got {raw_id!r}")
        sid = str(raw_id)
    label = None
    if "category" in m:
        label = _value(obj, m["category"], required=False)
        if label is not None and not isinstance(label, str):
            raise _RecordError(m["category"], f"expected str, got {type(label).__name__}")
    category = _category(label, cfg, m.get("category", "category"))
    return _sample(sid, cfg, context, responses, ranks, category, rank_field=rank_field,
                   context_field=m["context"])
