"""The ``dmoerm`` command line: train, evaluate, score, label, serve, submit, promote.

Every command takes ``--config FILE`` (YAML) and trailing ``dotted.key=value`` overrides where it has a
config. Exit status 2 and one clear line on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("dmoerm")


def _setup_logging(verbose: bool) -> None:
    """Log records on standard error: INFO, DEBUG with ``--verbose``, or ``DMOERM_LOG_LEVEL``'s level
    (``dmoerm train`` sends them to its run's log file instead, see ``cmd_train``)."""
    from dmoerm.runlog import FORMAT, QUIET, log_level

    try:
        level = logging.DEBUG if verbose else log_level()[0]
    except ValueError as e:
        print(f"dmoerm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S")
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def cmd_train(args: argparse.Namespace) -> int:
    """The whole recipe in this process: the same stages as the Ray job, on ``platform.storage_uri``."""
    import os
    import time

    from dmoerm.config import load_config
    from dmoerm.pipeline import train_locally
    from dmoerm.progress import StageProgress
    from dmoerm.runlog import log_dir, log_level, log_to_file

    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    cfg = load_config(args.config, args.overrides)
    log = (log_dir(cfg.platform.storage_uri, cfg.output_dir)
           / f"train-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
    with log_to_file(log, args.verbose) as terminal:
        print(f"log: {log}", file=terminal, flush=True)
        plain = args.no_progress or log_level(args.verbose)[1]  # no redrawing between log lines
        with StageProgress(terminal, live=False if plain else None) as progress:
            result = train_locally(cfg, progress)
    print()
    print(f"DMoERM vs single RM, pairwise accuracy on held-out test pairs ({cfg.name}):")
    print(result.report["table"])
    print(f"\nthe whole log: {log}")
    print(f"stages kept under: {cfg.platform.storage_uri} (a re-run skips what is finished)")
    print(f"bundle written to: {result.bundle_uri}")
    return 0


def _load_samples(path: str, fmt: str, mapping: list[str] | None = None):
    """A data file through the loaders: ``--format`` and, for ``mapped``, the ``--map`` items."""
    from dmoerm.data.loaders import SourceConfig, load_source
    from dmoerm.data.mapped import parse_map

    res = load_source(SourceConfig(path=path, format=fmt, on_error="raise",
                                   map=parse_map(mapping) if mapping else {}))
    if res.skipped:
        logger.warning(res.summary())
    return res.samples


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmoerm.bundle import load_bundle
    from dmoerm.evaluation import check_evaluable, evaluate

    samples = _load_samples(args.data, args.format, args.map)
    check_evaluable(samples)  # bad data fails before the (slow) bundle load
    loaded = load_bundle(args.bundle, base=args.base)
    report = evaluate(loaded.model, samples, loaded.baseline)
    print(report.table())
    if args.output:  # metrics, both models' per-pair outcomes, the interval, truncation, notes
        Path(args.output).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """jsonl of conversations in (``{"context": [{role, content}...], "responses": [...]}`` per line, or any
    loader format via --format), one line per input out with rewards and per-capability scores."""
    from dmoerm.bundle import load_bundle

    if args.format == "conversations":  # the input is read and checked before the (slow) bundle load
        rows = _read_conversations(args.input)
    else:
        rows = [(s.id, s.context, s.responses) for s in _load_samples(args.input, args.format, args.map)]
    if not rows:
        raise ValueError(f"{args.input}: no conversations to score")
    loaded = load_bundle(args.bundle, base=args.base)
    flat_ctx = [c for _, c, rs in rows for _ in rs]
    flat_resp = [r for _, _, rs in rows for r in rs]
    scores = loaded.model.score(flat_ctx, flat_resp)
    lines = []
    k = 0
    for rid, _, rs in rows:
        mine = scores[k: k + len(rs)]
        k += len(rs)
        lines.append(json.dumps({"id": rid, "rewards": [s.reward for s in mine], "category": mine[0].category,
                                 "category_prob": mine[0].category_prob,
                                 "capability_scores": [s.capability_scores for s in mine]}, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _read_conversations(path: str):
    from dmoerm.data.records import DataError, Turn

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = (" (this looks like a JSON array file: --format conversations reads one JSON object per "
                        "line)" if n == 1 and line.lstrip().startswith("[") else "")
                raise DataError(f"invalid JSON: {e.msg}{hint}", path=path, line=n) from None
            if not isinstance(obj, dict):
                hint = " (--format conversations reads JSON Lines: one object per line)" * isinstance(obj, list)
                raise DataError(f"expected a JSON object {{\"context\": [...], \"responses\": [...]}}, got a "
                                f"JSON {_json_kind(obj)}{hint}", path=path, line=n)
            if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
                raise DataError(f"id must be a string or an integer, got {obj['id']!r}", path=path, line=n,
                                field_name="id")
            for key, kind in (("context", list), ("responses", list)):
                if not isinstance(obj.get(key), kind) or not obj[key]:
                    raise DataError("missing or empty list", path=path, line=n, field_name=key)
            try:
                ctx = [Turn(t["role"], t["content"]) for t in obj["context"]]
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"each turn needs a role and a content ({e})", path=path, line=n,
                                field_name="context") from None
            if not all(isinstance(r, str) for r in obj["responses"]):
                raise DataError("responses must be strings", path=path, line=n, field_name="responses")
            rows.append((str(obj.get("id", n)), ctx, obj["responses"]))
    return rows


def cmd_label(args: argparse.Namespace) -> int:
    """Run only the labeling stage of a config and write the labelled samples (canonical jsonl)."""
    from dmoerm.config import load_config
    from dmoerm.data.loaders import write_samples
    from dmoerm.data.splits import split_samples
    from dmoerm.stages.data import load_data
    from dmoerm.stages.labels import label_capabilities, with_judge_cache

    cfg = with_judge_cache(load_config(args.config, args.overrides))
    samples, _ = load_data(cfg)
    splits = split_samples(samples, cfg.data.splits)
    caps = label_capabilities(cfg, splits)
    labelled = {id(s): s for v in caps.train.values() for s in v} | {id(s): s for v in caps.val.values() for s in v}
    n = write_samples(args.output, list(labelled.values()))
    print(json.dumps({"written": n, "output": args.output, "report": caps.report}, default=str))
    return 0


def _repo_module(name: str):
    """A module of the checkout's Ray Serve layer (``serve/``), imported from the checkout that
    ``dmoerm.submit.checkout_root`` finds (the jobs' layer is never imported: ``dmoerm.submit`` uploads it)."""
    import importlib

    from dmoerm.submit import checkout_root

    root = checkout_root()
    if not (root / (name.replace(".", "/") + ".py")).exists():
        raise ValueError(f"no {name.replace('.', '/')}.py under {root}: run from a dmoerm checkout or set DMOERM_REPO")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a bundle or registered model on a local Ray instance (or a cluster) until Ctrl-C."""
    argv = ["--model", args.model, "--host", args.host, "--port", str(args.port)]
    for flag, value in (("--config", args.serve_config), ("--tracking-uri", args.tracking_uri),
                        ("--address", args.address), ("--num-cpus", args.num_cpus)):
        if value is not None:
            argv += [flag, str(value)]
    return _repo_module("serve.deploy").main(argv)


def cmd_study(args: argparse.Namespace) -> int:
    """A study's Ray job (``dmoerm.studies.STUDIES``) in this process, on a local Ray instance or ``--address``."""
    from dmoerm.studies import STUDIES

    argv = ["--config", args.config, *args.overrides] + (["--address", args.address] if args.address else [])
    return _repo_module(STUDIES[args.study].job).main(argv)


def cmd_submit(args: argparse.Namespace) -> int:
    from dmoerm import submit

    submit.submit(args.config, args.overrides, args.address, wait=not args.no_wait)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dmoerm import submit

    print(submit.status(args.job_id, args.address))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from dmoerm import submit

    out = submit.logs(args.job_id, args.address, follow_logs=args.follow)
    if not args.follow:
        sys.stdout.write(out)
    return 0


def _registry_client(args: argparse.Namespace):
    from mlflow import MlflowClient

    return MlflowClient(args.tracking_uri)


def cmd_promote(args: argparse.Namespace) -> int:
    """Move the alias to a version only if it beats the current holder on the same evaluation pairs."""
    from dmoerm import registry
    from dmoerm.promotion import PromotionConfig

    client = _registry_client(args)
    cfg = PromotionConfig(confidence=args.confidence, category_tolerance=args.category_tolerance)
    decision = registry.decide_against_champion(client, args.name, args.version, cfg, alias=args.alias)
    if args.force and not decision.promote:
        decision = dataclasses.replace(decision, promote=True, reason=f"forced by an operator over: {decision.reason}")
    moved = registry.promote(client, args.name, args.version, decision, alias=args.alias)
    print(f"{args.name} version {args.version}: {'promoted to @' + args.alias if moved else 'refused'} - "
          f"{decision.reason}")
    return 0 if moved else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from dmoerm import registry

    mv = registry.rollback(_registry_client(args), args.name, alias=args.alias)
    print(f"{args.name}@{args.alias} restored to version {mv.version}")
    return 0


class _MapAction(argparse.Action):
    """``--map KEY=FIELD ...``: the items add up, and the format becomes ``mapped`` unless one is given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])
        if namespace.format == parser.get_default("format"):
            namespace.format = "mapped"


def _data_options(parser: argparse.ArgumentParser, default: str, extra: str = "") -> None:
    """``--format`` and ``--map``, with every format and its fields in the help epilog."""
    from dmoerm.data.loaders import FORMATS
    from dmoerm.data.mapped import formats_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = formats_help() + extra
    parser.add_argument("--format", default=default, metavar="FORMAT",
                        help=f"{'conversations, or ' if extra else ''}one of {', '.join(FORMATS)} (default "
                             f"{default}; the fields each needs: below)")
    parser.add_argument("--map", nargs="+", action=_MapAction, metavar="KEY=FIELD",
                        help="format 'mapped': where each field is, e.g. --map context=prompt chosen=chosen "
                             "rejected=rejected (implies --format mapped; keys: below)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmoerm", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run the whole DMoERM recipe in this process and write a bundle")
    t.add_argument("--config", required=True)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", help="dotted.key=value")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="pairwise accuracy of a bundle (and its baseline) on a dataset")
    e.add_argument("--bundle", required=True)
    e.add_argument("--data", required=True)
    _data_options(e, "dmoerm")
    e.add_argument("--base", help="read the base weights from here instead of the bundle's reference")
    e.add_argument("--output", help="write metrics as JSON here")
    e.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("score", help="score conversations with a bundle")
    s.add_argument("--bundle", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--output", default="-")
    _data_options(s, "conversations", "\n  conversations (score only, the default): JSON lines, context [{role, "
                                      "content}] and responses [str] per line; optional id")
    s.add_argument("--base")
    s.set_defaults(fn=cmd_score)

    lab = sub.add_parser("label", help="run the capability-labeling stage of a config")
    lab.add_argument("--config", required=True)
    lab.add_argument("--output", required=True)
    lab.add_argument("overrides", nargs="*")
    lab.set_defaults(fn=cmd_label)

    sb = sub.add_parser("submit", help="submit a Ray job to a cluster and stream its logs")
    sb.add_argument("what", choices=["pipeline"])
    sb.add_argument("--config", required=True)
    sb.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sb.add_argument("overrides", nargs="*")
    sb.set_defaults(fn=cmd_submit)
    sv = sub.add_parser("serve", help="serve a model over HTTP (Ray Serve): /v1/reward, /get_reward, /classify")
    sv.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a bundle folder")
    sv.add_argument("--config", dest="serve_config", help="Serve config (default: serve/config.yaml)")
    sv.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--address", help="a running Ray cluster (default: a local Ray instance)")
    sv.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    sv.set_defaults(fn=cmd_serve)
    from dmoerm.studies import STUDIES

    st = sub.add_parser("study", help="run one of the seed papers' studies as a Ray job and report it to MLflow")
    studies = st.add_subparsers(dest="study", required=True)
    for name, study in STUDIES.items():
        q = studies.add_parser(name, help=study.help)
        q.add_argument("--config", required=True)
        q.add_argument("--address", help="a running Ray cluster (default: a local Ray instance)")
        q.add_argument("overrides", nargs="*", help="dotted.key=value")
        q.set_defaults(fn=cmd_study)
    for name, fn, helptext in (("status", cmd_status, "a submitted job's status"),
                               ("logs", cmd_logs, "a submitted job's logs")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("job_id")
        q.add_argument("--address")
        if name == "logs":
            q.add_argument("--follow", action="store_true")
        q.set_defaults(fn=fn)

    for name, fn, helptext in (("promote", cmd_promote, "gated alias move to a registered version"),
                               ("rollback", cmd_rollback, "give the alias back to the previous holder")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--name", required=True, help="registered model name")
        q.add_argument("--alias", default="champion")
        q.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
        if name == "promote":
            q.add_argument("--version", required=True)
            q.add_argument("--confidence", type=float, default=0.95)
            q.add_argument("--category-tolerance", type=float, default=0.02)
            q.add_argument("--force", action="store_true", help="move the alias even if the check refuses "
                                                                 "(recorded on the version as forced)")
        q.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # dotted overrides may also come after the options
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"dmoerm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
