"""Loaders from public preference formats into canonical :class:`~dmoerm.data.records.Sample` lists.

Every loader gives the same rank semantics: **rank 1 = best = chosen**; ties share a rank. Sample ids are
``f"{name}:{line}"`` (1-based line, or item index for JSON-list files), stable across runs. Paths may be
local or ``s3://`` URIs (read through :func:`dmoerm.storage.open_uri`); ``.gz`` JSON-lines files are
decompressed. Malformed records raise :class:`DataError` naming the file, line (or item) and field, or
with ``on_error="skip"`` are counted in :attr:`LoadResult.skipped` and logged, never silently dropped.
A record that carries no preference is always skipped (and counted), even with ``on_error="raise"``: a
pair whose responses are identical (``"identical responses"``) or a sample whose ranks are all tied
(``"no preference pair (all ranks tied)"``). A file that is not UTF-8 on a line, a truncated ``.gz``, a
JSON array given to a JSON-lines format, a sample id seen twice (the later record is the error) and a
source whose every record was skipped are errors too. ``format: mapped`` reads any JSON, JSON-array,
JSONL, CSV or Parquet file through a field map (:mod:`dmoerm.data.mapped`); :func:`formats_help` lists
every format with the fields it needs.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from dmoerm import storage
from dmoerm.data import readers
from dmoerm.data.readers import RecordError as _RecordError
from dmoerm.data.records import DataError, Sample, Turn

logger = logging.getLogger(__name__)

Format = Literal["trl", "hh", "rmb_pairwise", "rmb_bon", "autoj_pairwise", "dmoerm_paper", "dmoerm", "mapped"]
FORMATS: tuple[str, ...] = get_args(Format)
IDENTICAL = "identical responses"
NO_PAIR = "no preference pair (all ranks tied)"
NO_PREFERENCE = (IDENTICAL, NO_PAIR)
"""Skip reasons that are not malformed input: counted and reported, never raised."""


@dataclass
class SourceConfig:
    """One preference data source to load."""

    path: str
    """Local path or ``s3://`` URI of a file; for ``rmb_*`` also a folder (all ``.json`` below, sorted)."""
    format: Format
    """``trl`` (jsonl/parquet chosen/rejected, plain or conversational), ``hh`` (Anthropic HH
    transcripts), ``rmb_pairwise``, ``rmb_bon``, ``autoj_pairwise``, ``dmoerm_paper``, ``dmoerm``, or
    ``mapped`` (any JSON / JSON-array / JSONL / CSV / Parquet file read through ``map``); the fields each
    needs: :func:`formats_help`."""
    category: str | None = None
    """Category given to every sample of this source (overrides the labels in the file)."""
    category_map: dict[str, str] = field(default_factory=dict)
    """Raw label -> category (rmb ``category_path`` with the ``*_set/`` folder dropped, matched by longest
    path prefix; autoj ``scenario``; paper ``label``). When given, an unmapped label is an error. When
    empty, the raw label is kept as the category (rmb, autoj, paper) or the category is None."""
    limit: int | None = None
    """Stop after this many loaded samples (skips do not count)."""
    on_error: Literal["raise", "skip"] = "raise"
    """``raise``: a malformed record raises DataError; ``skip``: it is counted in LoadResult.skipped."""
    name: str | None = None
    """Source name used in sample ids and ``Sample.source``; default ``<parent>/<file stem>``."""
    map: dict[str, str] = field(default_factory=dict)
    """``format: mapped`` only: canonical field -> the file's field (dotted for nested keys), e.g.
    ``{context: prompt, chosen: chosen, rejected: rejected}``; see :func:`dmoerm.data.mapped.check_map`."""

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"SourceConfig.path must be a non-empty path or s3:// URI, got {self.path!r}")
        if self.format not in FORMATS:
            raise ValueError(f"SourceConfig.format must be one of {FORMATS}, got {self.format!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"SourceConfig.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ValueError(f"SourceConfig.limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.category_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in self.category_map.items()):
            raise ValueError("SourceConfig.category_map must map label strings to non-empty category strings")
        if self.category is not None and (not isinstance(self.category, str) or not self.category):
            raise ValueError(f"SourceConfig.category must be a non-empty string or None, "
                             f"got {self.category!r}")
        if self.category is not None and self.category_map:
            raise ValueError("SourceConfig: give either category (one for all samples) or category_map, "
                             "not both")
        if self.format == "mapped" or self.map:
            from dmoerm.data.mapped import check_map

            if self.format != "mapped":
                raise ValueError(f"SourceConfig.map is only read by format 'mapped', not {self.format!r}")
            self.map = check_map(self.map)
            if self.category_map and "category" not in self.map:
                raise ValueError("SourceConfig: category_map needs a mapped category field (map category=...)")
        if self.category_map and self.format in ("hh", "trl"):
            raise ValueError(f"SourceConfig: format {self.format!r} has no per-record labels to map; "
                             "use category to label every sample")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"SourceConfig.name must be a non-empty string or None, got {self.name!r}")

    @property
    def source_name(self) -> str:
        """``name``, or ``<parent>/<stem>`` of the path (``hh-rlhf/harmless-base/test.jsonl.gz`` ->
        ``harmless-base/test``; a folder -> its own name)."""
        if self.name:
            return self.name
        parts = [p for p in self.path.rstrip("/").replace("s3://", "", 1).split("/") if p]
        stem = re.sub(r"(\.(jsonl|ndjson|json|parquet|csv|tsv))?(\.gz)?$", "", parts[-1])
        return f"{parts[-2]}/{stem}" if len(parts) > 1 and stem != parts[-1] else stem


@dataclass(frozen=True)
class Skip:
    """A record that was not loaded, and why."""

    line: int
    """1-based line (JSON lines), item index (JSON lists) or row (parquet)."""
    field: str | None
    """The offending field, or None when the whole record is unreadable (e.g. invalid JSON)."""
    reason: str
    """What was wrong, e.g. ``"identical responses"``."""
    path: str = ""
    """The file the record came from."""


@dataclass
class LoadResult:
    """What :func:`load_source` produced."""

    samples: list[Sample]
    """The loaded samples, in file order."""
    skipped: list[Skip]
    """Every record that was not loaded."""
    path: str
    """The source path or URI."""

    def summary(self) -> str:
        """E.g. ``"loaded 2312 samples from X; skipped 3 (2 x 'identical responses', 1 x ...)"``."""
        text = f"loaded {len(self.samples)} samples from {self.path}"
        if not self.skipped:
            return text
        counts = Counter(s.reason if s.field is None or s.reason in NO_PREFERENCE else f"{s.field}: {s.reason}"
                         for s in self.skipped)
        return text + f"; skipped {len(self.skipped)} (" + ", ".join(
            f"{n} x {reason!r}" for reason, n in counts.most_common()) + ")"


# ---------------------------------------------------------------- field helpers

def _get(obj: dict, key: str, kind: type | tuple[type, ...], label: str | None = None) -> Any:
    label = label or key
    if key not in obj or obj[key] is None:
        raise _RecordError(label, "missing required field")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _RecordError(label, f"expected {want}, got {type(value).__name__}")
    return value


def _str_list(obj: dict, key: str, min_len: int = 0) -> list[str]:
    value = _get(obj, key, list)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _RecordError(f"{key}[{i}]", f"expected str, got {type(item).__name__}")
    if len(value) < min_len:
        raise _RecordError(key, f"needs at least {min_len} entries, got {len(value)}")
    return value


def _messages(value: Any, label: str) -> list[Turn]:
    if not isinstance(value, list):
        raise _RecordError(label, f"expected a list of messages, got {type(value).__name__}")
    turns = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _RecordError(f"{label}[{i}]", f"expected a message object, got {type(msg).__name__}")
        role, content = _get(msg, "role", str, f"{label}[{i}].role"), _get(msg, "content", str,
                                                                          f"{label}[{i}].content")
        try:
            turns.append(Turn(role, content))  # type: ignore[arg-type]
        except ValueError as err:
            raise _RecordError(f"{label}[{i}].role", str(err)) from None
    return turns


def _category(raw: str | None, cfg: SourceConfig, label: str, by_path: bool = False) -> str | None:
    if cfg.category is not None:
        return cfg.category
    if not cfg.category_map or raw is None:
        if cfg.category_map:
            raise _RecordError(label, "missing label, but category_map is given")
        return raw
    if raw in cfg.category_map:
        return cfg.category_map[raw]
    if by_path:  # longest path-prefix match: {"Helpfulness": ...} covers "Helpfulness/Chat/Casual"
        parts = raw.split("/")
        for n in range(len(parts) - 1, 0, -1):
            if "/".join(parts[:n]) in cfg.category_map:
                return cfg.category_map["/".join(parts[:n])]
    raise _RecordError(label, f"label {raw!r} is not in category_map (known: {sorted(cfg.category_map)})")


def _sample(sid: str, cfg: SourceConfig, context: list[Turn], responses: list[str], ranks: list[int],
            category: str | None, rank_field: str = "rank", context_field: str = "context",
            tied_ok: bool = False) -> Sample:
    """A validated Sample. All ranks tied is a NO_PAIR skip unless ``tied_ok`` (the record carries
    capability preferences of its own)."""
    if not context:
        raise _RecordError(context_field, "the conversation context is empty")
    if len(ranks) != len(responses):
        raise _RecordError(rank_field, f"{len(ranks)} ranks for {len(responses)} responses")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise _RecordError(f"{rank_field}[{i}]", f"ranks must be integers >= 1 (1 = best), got {r!r}")
    seen: dict[str, int] = {}
    for text, rank in zip(responses, ranks):
        if seen.setdefault(text.strip(), rank) != rank:
            raise _RecordError(None, IDENTICAL)  # the same text both better and worse: no preference
    if len(set(ranks)) == 1 and not tied_ok:
        raise _RecordError(None, NO_PAIR)
    return Sample(id=sid, context=context, responses=responses, ranks=ranks, category=category,
                  source=cfg.source_name)


# ---------------------------------------------------------------- formats (record -> Sample)

_HH_MARK = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def _hh_turns(prompt: str, label: str) -> list[Turn]:
    parts = _HH_MARK.split(prompt)
    if parts[0].strip():
        raise _RecordError(label, "transcript must start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Turn(roles[r], c.strip()) for r, c in zip(parts[1::2], parts[2::2])]  # type: ignore[arg-type]


def _parse_hh(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    chosen, rejected = _get(obj, "chosen", str), _get(obj, "rejected", str)
    # The prompt is the longest shared prefix ending at an "Assistant:" marker: responses sometimes
    # contain hallucinated "\n\nHuman:" turns of their own, which belong to the response.
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(_HH_ASSISTANT, 0, common)
    if cut < 0:
        raise _RecordError("rejected", "chosen and rejected do not share a prompt ending in 'Assistant:'")
    end = cut + len(_HH_ASSISTANT)
    good, bad = chosen[end:], rejected[end:]
    if "\n\nHuman:" in os.path.commonprefix([good, bad]):
        raise _RecordError("rejected", "chosen and rejected contexts differ before the last assistant turn")
    context = _hh_turns(chosen[:cut], "chosen")
    if not any(t.role == "user" for t in context):
        raise _RecordError("chosen", "no 'Human:' turn before the last assistant turn")
    return _sample(sid, cfg, context, [good.strip(), bad.strip()], [1, 2], cfg.category)


def _parse_trl(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    chosen, rejected = _get(obj, "chosen", (str, list)), _get(obj, "rejected", (str, list))
    prompt = obj.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _RecordError("rejected", "chosen and rejected must both be strings or both message lists")
    if isinstance(chosen, str):  # plain: prompt + completion strings
        prompt = _get(obj, "prompt", str)
        return _sample(sid, cfg, [Turn("user", prompt)], [chosen, rejected], [1, 2], cfg.category)
    context = _messages(prompt, "prompt") if prompt is not None else []
    good, bad = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for label, turns in (("chosen", good), ("rejected", bad)):
        if not turns or turns[-1].role != "assistant":
            raise _RecordError(label, "must end with an assistant message")
    if good[:-1] != bad[:-1]:
        raise _RecordError("rejected", "chosen and rejected differ before their last message")
    return _sample(sid, cfg, context + good[:-1], [good[-1].content, bad[-1].content], [1, 2], cfg.category,
                   context_field="prompt")


def _rmb_common(obj: dict, cfg: SourceConfig) -> tuple[list[Turn], str | None]:
    context = _messages(_get(obj, "conversation_input", list), "conversation_input")
    raw = obj.get("category_path")
    if raw is not None and not isinstance(raw, str):
        raise _RecordError("category_path", f"expected str, got {type(raw).__name__}")
    if raw is not None:
        raw = re.sub(r"^(Pairwise_set|BoN_set)/", "", raw)
    return context, _category(raw, cfg, "category_path", by_path=True)


def _answer(obj: dict, key: str) -> str:
    return _get(_get(obj, key, dict), "answer", str, f"{key}.answer")


def _parse_rmb_pairwise(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    context, category = _rmb_common(obj, cfg)
    answers = [_answer(obj, "chosen"), _answer(obj, "reject")]
    return _sample(sid, cfg, context, answers, [1, 2], category, context_field="conversation_input")


def _parse_rmb_bon(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    context, category = _rmb_common(obj, cfg)
    losers = _get(obj, "loser_list", list)
    if not losers:
        raise _RecordError("loser_list", "needs at least 1 entry, got 0")
    answers = [_answer(obj, "bon_best")] + [_answer({"loser_list": x}, "loser_list") for x in losers]
    return _sample(sid, cfg, context, answers, [1] + [2] * len(losers), category,
                   context_field="conversation_input")


def _parse_autoj(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    label = _get(obj, "label", int)
    ranks = {0: [1, 2], 1: [2, 1], 2: [1, 1]}.get(label)
    if ranks is None:
        raise _RecordError("label", f"must be 0 (response 1 better), 1 (response 2 better) or 2 (tie), "
                                    f"got {label}")
    scenario = obj.get("scenario")
    if scenario is not None and not isinstance(scenario, str):
        raise _RecordError("scenario", f"expected str, got {type(scenario).__name__}")
    responses = [_get(obj, "response 1", str), _get(obj, "response 2", str)]
    context = [Turn("user", _get(obj, "prompt", str))]
    return _sample(sid, cfg, context, responses, ranks, _category(scenario, cfg, "scenario"))


def _parse_paper(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    """``src`` user turns, ``tgt`` assistant turns (one fewer), candidate ``response`` list, ``rank``:
    smaller is better, rank 1 is the best (as in the paper's training code), ``label``: category name."""
    src, tgt = _str_list(obj, "src", 1), _str_list(obj, "tgt")
    if len(src) != len(tgt) + 1:
        raise _RecordError("tgt", f"needs len(src) - 1 = {len(src) - 1} assistant turns, got {len(tgt)}")
    context = [Turn("user", src[0])]
    for assistant, user in zip(tgt, src[1:]):
        context += [Turn("assistant", assistant), Turn("user", user)]
    responses, ranks = _str_list(obj, "response", 2), _get(obj, "rank", list)
    label = obj.get("label")
    if label is not None and not isinstance(label, str):
        raise _RecordError("label", f"expected str, got {type(label).__name__}")
    return _sample(sid, cfg, context, responses, ranks, _category(label, cfg, "label"))


def _capability_prefs(value: Any) -> dict[str, list]:
    """``{capability: [[better, worse], ...]}`` checked field by field (None: no preferences)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _RecordError("capability_prefs", "expected an object of capability -> [[better, worse], ...], "
                                               f"got {type(value).__name__}")
    for cap, pairs in value.items():
        if not isinstance(pairs, list):
            raise _RecordError(f"capability_prefs.{cap}", f"expected a list of [better, worse] pairs, "
                                                          f"got {type(pairs).__name__}")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, list) or len(pair) != 2 or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in pair):
                raise _RecordError(f"capability_prefs.{cap}[{i}]",
                                   f"expected a [better, worse] pair of response indices, got {pair!r}")
    return value


def _parse_dmoerm(obj: dict, sid: str, cfg: SourceConfig) -> Sample:
    """Canonical records keep their own ``id`` (falls back to ``sid``)."""
    context = _messages(_get(obj, "context", list), "context")
    responses, ranks = _str_list(obj, "responses", 2), _get(obj, "ranks", list)
    raw = obj.get("category")
    if raw is not None and not isinstance(raw, str):
        raise _RecordError("category", f"expected str, got {type(raw).__name__}")
    category = _category(raw, cfg, "category")
    prefs = _capability_prefs(obj.get("capability_prefs"))
    sample = _sample(str(obj.get("id") or sid), cfg, context, responses, ranks, category, "ranks",
                     tied_ok=any(prefs.values()))
    try:
        full = Sample.from_json({**obj, "id": sample.id, "category": category, "capability_prefs": prefs})
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise _RecordError("capability_prefs", str(err)) from None
    full.source = obj.get("source") or cfg.source_name
    return full


_PARSERS: dict[str, Callable[[dict, str, SourceConfig], Sample]] = {
    "hh": _parse_hh, "trl": _parse_trl, "rmb_pairwise": _parse_rmb_pairwise, "rmb_bon": _parse_rmb_bon,
    "autoj_pairwise": _parse_autoj, "dmoerm_paper": _parse_paper, "dmoerm": _parse_dmoerm,
}


def _files(cfg: SourceConfig) -> list[tuple[str, str]]:
    """(uri, source name) for every file of the source; rmb folders expand to their sorted .json files."""
    if not cfg.format.startswith("rmb_"):
        return [(cfg.path, cfg.source_name)]
    uris = storage.list_uris(cfg.path)
    if uris == [cfg.path] or uris == [cfg.path.replace("file://", "", 1)]:
        return [(cfg.path, cfg.source_name)]
    found = sorted(u for u in uris if u.endswith(".json"))
    if not found:
        raise FileNotFoundError(f"no .json files under {cfg.path!r}")

    def relative(uri: str) -> str:
        if storage.is_s3(uri):
            return uri[len(cfg.path.rstrip("/")) + 1:]
        return os.path.relpath(uri, cfg.path.replace("file://", "", 1)).replace(os.sep, "/")

    return [(u, f"{cfg.source_name}/{relative(u)[:-len('.json')]}") for u in found]


def _records(cfg: SourceConfig, uri: str) -> Iterator[readers.Record]:
    if cfg.format == "mapped":
        from dmoerm.data.mapped import read_records

        return read_records(uri, cfg.map)
    if cfg.format.startswith("rmb_"):
        return readers.read_json(uri)
    if re.search(r"\.parquet$", uri):
        return readers.read_parquet(uri)
    return readers.read_jsonl(uri, cfg.format)


def _parser(cfg: SourceConfig) -> Callable[[dict, str, SourceConfig], Sample]:
    if cfg.format == "mapped":
        from dmoerm.data.mapped import parse_mapped

        return parse_mapped
    return _PARSERS[cfg.format]


def load_source(cfg: SourceConfig) -> LoadResult:
    """Load one source into canonical samples (see the module docstring for semantics).

    Raises:
        DataError: a malformed record with ``on_error="raise"`` (names file, line or item, and field), a
            file that cannot be read as a whole (not a JSON list, a truncated ``.gz``, a JSON array given
            to a JSON-lines format: always), or a source whose every record was skipped (always). A file
            with no record at all gives an empty result (a stage's empty split); :func:`load_sources`,
            which reads a config's sources, refuses it.
        FileNotFoundError: the path does not exist.
    """
    parse = _parser(cfg)
    samples: list[Sample] = []
    skipped: list[Skip] = []
    first_at: dict[str, str] = {}  # sample id -> where it was first loaded
    for uri, name in _files(cfg):
        for n, unit, obj in _records(cfg, uri):
            where = f"line {n}" if unit is None else f"{unit} {n}"
            try:
                if isinstance(obj, _RecordError):
                    raise obj
                sample = parse(obj, f"{name}:{n}", cfg)
                if sample.id in first_at:
                    raise _RecordError("id", f"duplicate sample id {sample.id!r} (first at {first_at[sample.id]}); "
                                             "ids must be unique within a dataset")
                first_at[sample.id] = where if uri == cfg.path else f"{uri} {where}"
                samples.append(sample)
            except _RecordError as err:
                error = DataError(err.reason if unit is None else f"{where}: {err.reason}", path=uri,
                                  line=n if unit is None else None, field_name=err.field_name)
                if err.reason not in NO_PREFERENCE and cfg.on_error == "raise":
                    raise error from None
                skipped.append(Skip(n, err.field_name, err.reason, uri))
                (logger.debug if err.reason in NO_PREFERENCE else logger.warning)("skipped %s", error)
            if cfg.limit is not None and len(samples) >= cfg.limit:
                break
        if cfg.limit is not None and len(samples) >= cfg.limit:
            break
    result = LoadResult(samples, skipped, cfg.path)
    if not samples and skipped:
        raise DataError(f"no usable sample: {result.summary()}", path=cfg.path)
    malformed = any(s.reason not in NO_PREFERENCE for s in skipped)
    (logger.warning if malformed else logger.info)("%s", result.summary())
    return result


def load_sources(cfgs: Sequence[SourceConfig]) -> list[LoadResult]:
    """:func:`load_source` for each of a config's sources. A source with no record, and a sample id in two
    sources, are DataErrors (ids key the evaluation's pairs, promotion's bootstrap and the labels, so a
    repeated id would merge two samples)."""
    results = [load_source(c) for c in cfgs]
    for cfg, res in zip(cfgs, results):
        if not res.samples:
            raise DataError("no records found", path=cfg.path)
    owner: dict[str, int] = {}
    for i, (cfg, res) in enumerate(zip(cfgs, results)):
        for s in res.samples:
            j = owner.setdefault(s.id, i)
            if j != i:
                raise DataError(f"sample id {s.id!r} is in two sources, {cfgs[j].path} and {cfg.path}: give the "
                                "sources distinct names (ids are '<name>:<line>' unless the file has its own) or "
                                "fix the ids",
                                path=cfg.path, field_name="id")
    return results


def write_samples(path_or_uri: str | os.PathLike[str], samples: list[Sample]) -> int:
    """Write canonical JSON lines (gzip if the name ends in ``.gz``) atomically; returns the count."""
    uri = os.fspath(path_or_uri)
    with storage.open_uri(uri, "wb") as raw:
        out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if uri.endswith(".gz") else raw
        for s in samples:
            out.write((json.dumps(s.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
        if out is not raw:
            out.close()
    return len(samples)
