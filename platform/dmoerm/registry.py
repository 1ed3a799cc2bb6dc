"""Model registry helpers over ``mlflow.MlflowClient``: versions, the champion alias, promotion and rollback.

Conventions (all visible in the MLflow UI):
- a version's evaluation outcomes live in its run as the JSON artifact ``evaluation/pair_outcomes.json``,
  so a later candidate can be compared with the champion on the same evaluation pairs;
- every promotion decision is recorded on the candidate version as ``dmoerm.promotion.*`` tags;
- the registered-model tag ``dmoerm.<alias>_history`` (e.g. ``dmoerm.champion_history``) is a JSON list of
  the versions that held the alias, oldest first, the current holder last; :func:`rollback` pops it.

The history is read-modify-write on one tag: run one promotion per model at a time (one pipeline owns it).
MLflow is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmoerm.promotion import Decision, PairOutcome, PairOutcomes, PromotionConfig, decide

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from dmoerm.config import PlatformConfig
    from dmoerm.stages.store import StageStore

log = logging.getLogger(__name__)

PAIR_OUTCOMES_ARTIFACT = "evaluation/pair_outcomes.json"
"""Path, inside a version's run artifacts, of its per-pair evaluation outcomes."""
PAIR_OUTCOMES_FORMAT = "dmoerm.pair_outcomes/v1"
TAG_PREFIX = "dmoerm."
_MAX_TAG_VALUE = 5000  # MLflow's limit for a model-version tag value


def history_tag(alias: str) -> str:
    """Registered-model tag holding the JSON history of ``alias``, e.g. ``dmoerm.champion_history``."""
    return f"{TAG_PREFIX}{alias}_history"


def register_version(
    client: MlflowClient,
    name: str,
    source_uri: str,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    pair_outcomes: PairOutcomes | None = None,
    model_id: str | None = None,
) -> ModelVersion:
    """Register ``source_uri`` (an artifact URI of run ``run_id``, e.g. ``<run artifact_uri>/bundle``) as a
    new version of ``name``, creating the registered model if missing.

    ``metrics`` are logged to the run and copied onto the version as ``dmoerm.metric.<key>`` tags;
    ``tags`` go on the version as given; ``pair_outcomes`` (if any) are stored with :func:`log_pair_outcomes`.
    """
    from mlflow.entities import Metric

    if not name:
        raise ValueError("register_version needs a registered model name, e.g. 'dmoerm-demo'")
    if not run_id:
        raise ValueError(f"register_version({name!r}) needs the run_id that produced {source_uri!r}")
    _ensure_registered_model(client, name)
    if metrics:
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
        if bad:
            raise ValueError(f"metrics must be numbers; not numeric: {bad}")
        metric_list = [Metric(key=k, value=float(v), timestamp=_now_ms(), step=0) for k, v in metrics.items()]
        client.log_batch(run_id, metrics=metric_list)
    if pair_outcomes is not None:
        log_pair_outcomes(client, run_id, pair_outcomes)
    version_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    version_tags.update({f"{TAG_PREFIX}metric.{k}": repr(float(v)) for k, v in (metrics or {}).items()})
    if pair_outcomes is not None:
        version_tags[f"{TAG_PREFIX}evaluation.artifact"] = PAIR_OUTCOMES_ARTIFACT
    mv = client.create_model_version(name, source=source_uri, run_id=run_id, tags=version_tags, model_id=model_id)
    log.info("registered %s version %s from %s", name, mv.version, source_uri)
    return mv


def log_pair_outcomes(client: MlflowClient, run_id: str, outcomes: PairOutcomes) -> None:
    """Store per-pair evaluation outcomes as the JSON artifact ``evaluation/pair_outcomes.json`` of a run."""
    pairs = {}
    for pair_id, outcome in outcomes.items():
        category, correct = outcome
        if not isinstance(correct, bool):
            raise ValueError(f"pair {pair_id!r}: 'correct' must be a bool, got {correct!r}")
        pairs[str(pair_id)] = {"category": str(category), "correct": correct}
    client.log_dict(run_id, {"format": PAIR_OUTCOMES_FORMAT, "pairs": pairs}, PAIR_OUTCOMES_ARTIFACT)


def load_pair_outcomes(client: MlflowClient, name: str, version: str | int) -> dict[str, PairOutcome]:
    """Evaluation outcomes stored with ``name`` version ``version`` (see :func:`log_pair_outcomes`)."""
    mv = client.get_model_version(name, str(version))
    if not mv.run_id:
        raise ValueError(f"{name} version {version} has no run: it was registered without run_id")
    with tempfile.TemporaryDirectory(prefix="dmoerm-outcomes-") as tmp:
        try:
            local = client.download_artifacts(mv.run_id, PAIR_OUTCOMES_ARTIFACT, dst_path=tmp)
        except Exception as err:  # MLflow raises different types per artifact store
            raise ValueError(
                f"{name} version {version}: run {mv.run_id} has no {PAIR_OUTCOMES_ARTIFACT} "
                f"({type(err).__name__}); log the evaluation with log_pair_outcomes() first"
            ) from err
        payload = json.loads(Path(local).read_text())
    if payload.get("format") != PAIR_OUTCOMES_FORMAT:
        raise ValueError(
            f"{name} version {version}: unknown pair-outcomes format {payload.get('format')!r}, "
            f"expected {PAIR_OUTCOMES_FORMAT!r}"
        )
    return {pid: PairOutcome(p["category"], bool(p["correct"])) for pid, p in payload["pairs"].items()}


def get_alias(client: MlflowClient, name: str, alias: str = "champion") -> ModelVersion | None:
    """The version holding ``alias``, or None when the alias (or the registered model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def get_history(client: MlflowClient, name: str, alias: str = "champion") -> list[str]:
    """Versions that held ``alias`` through :func:`promote`, oldest first, the current holder last."""
    raw = client.get_registered_model(name).tags.get(history_tag(alias))
    if not raw:
        return []
    history = json.loads(raw)
    if not isinstance(history, list):
        raise ValueError(f"tag {history_tag(alias)} of {name} must be a JSON list of versions, got {raw!r}")
    return [str(v) for v in history]


def decide_against_champion(
    client: MlflowClient,
    name: str,
    version: str | int,
    cfg: PromotionConfig | None = None,
    alias: str = "champion",
    baseline: PairOutcomes | None = None,
) -> Decision:
    """Compare ``version``'s stored outcomes with the current ``alias`` holder's on the same pairs.

    With no holder yet (the first model), ``baseline`` outcomes (e.g. a base model or the previous system
    scored on the same pairs) take the incumbent's place.
    """
    candidate = load_pair_outcomes(client, name, version)
    champion = get_alias(client, name, alias)
    if champion is not None:
        if str(champion.version) == str(version):
            raise ValueError(f"{name} version {version} already holds '{alias}': nothing to compare")
        return decide(candidate, load_pair_outcomes(client, name, champion.version), cfg)
    if baseline is None:
        raise ValueError(
            f"{name} has no '{alias}' yet: pass baseline= outcomes (e.g. the base model on the same pairs)"
        )
    return decide(candidate, baseline, cfg)


def promote(
    client: MlflowClient, name: str, version: str | int, decision: Decision, alias: str = "champion"
) -> bool:
    """Record ``decision`` on the version and move ``alias`` to it only when ``decision.promote``.

    Returns True when the alias moved. The version gets the tags ``dmoerm.promotion.decision``
    (``promoted``/``refused``), ``.reason``, ``.delta``, ``.ci_low``, ``.ci_high``, ``.per_category`` and
    ``.previous_holder``; on promotion the version is appended to ``dmoerm.<alias>_history``.
    """
    version = str(version)
    client.get_model_version(name, version)  # fail early, with MLflow's message, on an unknown version
    holder = get_alias(client, name, alias)
    holder_version = str(holder.version) if holder is not None else ""
    tags = {
        "decision": "promoted" if decision.promote else "refused",
        "reason": decision.reason,
        "delta": repr(decision.delta),
        "ci_low": repr(decision.ci_low),
        "ci_high": repr(decision.ci_high),
        "previous_holder": holder_version or "none",
        "alias": alias,
    }
    per_category = json.dumps(decision.per_category, sort_keys=True)
    if len(per_category) <= _MAX_TAG_VALUE:
        tags["per_category"] = per_category
    else:
        log.warning("per-category figures of %s v%s too long for a tag; not recorded", name, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{TAG_PREFIX}promotion.{key}", _fit_tag(value))
    if not decision.promote:
        log.info("%s version %s refused for '%s': %s", name, version, alias, decision.reason)
        return False
    history = _history_with_holder(client, name, alias, holder_version)
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_alias(name, alias, version)
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(history))
    log.info("%s version %s promoted to '%s' (previous: %s)", name, version, alias, holder_version or "none")
    return True


def rollback(client: MlflowClient, name: str, alias: str = "champion") -> ModelVersion:
    """Give ``alias`` back to the previous holder recorded by :func:`promote`, and record the rollback.

    The demoted version gets ``dmoerm.rollback.demoted=true``; the restored one
    ``dmoerm.rollback.restored_from=<demoted version>``. ValueError when there is no previous holder.
    """
    holder = get_alias(client, name, alias)
    if holder is None:
        raise ValueError(f"{name} has no '{alias}' alias: nothing to roll back")
    history = _history_with_holder(client, name, alias, str(holder.version))
    if len(history) < 2:
        raise ValueError(
            f"{name}: no previous '{alias}' to roll back to (history {history}); "
            f"version {holder.version} is the first holder"
        )
    demoted = history.pop()
    restored = history[-1]
    client.set_registered_model_alias(name, alias, restored)
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(history))
    client.set_model_version_tag(name, demoted, f"{TAG_PREFIX}rollback.demoted", "true")
    client.set_model_version_tag(name, restored, f"{TAG_PREFIX}rollback.restored_from", demoted)
    log.warning("%s '%s' rolled back from version %s to %s", name, alias, demoted, restored)
    return client.get_model_version(name, restored)


def register_evaluation(client: MlflowClient, tracking_uri: str, run_id: str, name: str, platform: PlatformConfig,
                        store: StageStore, evaluation: str) -> tuple[str, dict[str, Any]]:
    """Log an ``evaluate`` stage's bundle as a pyfunc model of run ``run_id``, register it under ``name``
    with its metrics and per-pair outcomes, and move ``platform.alias`` only if it beats the holder on the
    same pairs (the first model: the single-RM baseline). A holder evaluated on other pairs (other data or
    splits) is re-scored on this candidate's test samples; if that fails, promotion is refused with the
    reason recorded. Idempotent: a version that already holds this evaluation and its decision is returned
    as it is (``"skipped": True``); one registered by a run that stopped before deciding is decided, never
    registered twice. Returns (version, decision)."""
    import mlflow

    from dmoerm.mlflow_model import log_bundle_model

    mine = [mv for mv in _versions(client, name) if mv.tags.get("dmoerm.evaluation_key") == evaluation]
    for mv in mine:
        if "dmoerm.promotion.decision" in mv.tags:
            log.info("%-28s skipped: %s version %s holds this evaluation", "register", name, mv.version)
            return mv.version, {"promote": mv.tags["dmoerm.promotion.decision"] == "promoted",
                                "reason": mv.tags.get("dmoerm.promotion.reason", ""), "skipped": True}
    report = store.get_json("evaluate", evaluation, "report.json")
    outcomes = {k: PairOutcome(*v) for k, v in store.get_json("evaluate", evaluation, "pair_outcomes.json").items()}
    if mine:  # registered by a run that stopped before the decision: decide it now
        mv = mine[0]
        log.info("%-28s resumed: %s version %s holds this evaluation, undecided", "register", name, mv.version)
    else:
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = log_bundle_model(store.path("evaluate", evaluation, "bundle"))
        mv = register_version(client, name, info.model_uri, run_id, model_id=info.model_id,
                              metrics={k: v for k, v in report["metrics"].items() if v == v},
                              tags={"dmoerm.evaluation_key": evaluation}, pair_outcomes=outcomes)
    holder = get_alias(client, name, platform.alias)
    if holder is None and not store.path("evaluate", evaluation, "baseline_pair_outcomes.json").exists():
        decision = Decision(False, f"Refused: no '{platform.alias}' holder yet and no single-RM baseline to beat "
                            "(baseline: false); promote it yourself with `dmoerm promote --force` if you trust it",
                            float("nan"), float("nan"), float("nan"))
    elif holder is None:
        raw = store.get_json("evaluate", evaluation, "baseline_pair_outcomes.json")
        decision = decide(outcomes, {k: PairOutcome(*v) for k, v in raw.items()}, platform.promotion)
    else:
        try:
            incumbent = holder_outcomes(client, tracking_uri, name, holder.version, outcomes, store, evaluation)
            decision = decide(outcomes, incumbent, platform.promotion)
        except Exception as err:  # noqa: BLE001 - any failure to compare refuses, with the reason recorded
            log.warning("%s version %s: cannot compare with version %s: %s", name, mv.version, holder.version, err)
            decision = Decision(False, f"Refused: could not compare with '{platform.alias}' version "
                                f"{holder.version} on this candidate's test pairs: {type(err).__name__}: {err}",
                                float("nan"), float("nan"), float("nan"))
    promote(client, name, mv.version, decision, alias=platform.alias)
    return mv.version, {"promote": decision.promote, "reason": decision.reason}


def holder_outcomes(client: MlflowClient, tracking_uri: str, name: str, version: str, candidate: PairOutcomes,
                    store: StageStore, evaluation: str) -> dict[str, PairOutcome]:
    """The holder's outcomes on the candidate's pairs: its stored ones when they are the same pairs, else its
    bundle (from the registry) scored on the candidate's test samples, the same way the candidate was."""
    stored = load_pair_outcomes(client, name, version)
    if set(stored) == set(candidate):
        return stored
    from dmoerm.bundle import load_bundle
    from dmoerm.evaluation import evaluate

    samples = store.get_samples("evaluate", evaluation, "test.jsonl")
    log.info("%s version %s was evaluated on other pairs (%d shared of %d): re-scoring it on the candidate's "
             "%d test samples", name, version, len(set(stored) & set(candidate)), len(candidate), len(samples))
    return dict(evaluate(load_bundle(download_bundle(tracking_uri, name, version)).model, samples).outcomes)


def download_bundle(tracking_uri: str | None, name: str, version: str) -> Path:
    """The DMoERM bundle folder of registered model ``name`` version ``version``, downloaded from its
    pyfunc model (the ``bundle`` artifact)."""
    import mlflow
    import yaml

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "bundle" in artifacts:
        return model_dir / artifacts["bundle"]["path"]
    found = [p.parent for p in model_dir.rglob("bundle.json")]
    if not found:
        raise ValueError(f"{name} version {version}: the registered model holds no DMoERM bundle")
    return found[0]


def _versions(client: MlflowClient, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def _history_with_holder(client: MlflowClient, name: str, alias: str, holder_version: str) -> list[str]:
    """The recorded history, ending with the current holder even if the alias was moved by hand."""
    history = get_history(client, name, alias)
    if holder_version and (not history or history[-1] != holder_version):
        log.warning(
            "%s: '%s' is on version %s but the recorded history is %s (moved outside dmoerm); "
            "treating it as the latest holder",
            name, alias, holder_version, history,
        )
        history.append(holder_version)
    return history


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
        log.info("created registered model %s", name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _fit_tag(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_TAG_VALUE else text[: _MAX_TAG_VALUE - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)
