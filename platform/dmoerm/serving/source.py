"""Where a served bundle comes from: a registry URI (``models:/NAME@alias``, ``models:/NAME/3``), a local
folder or an ``s3://`` prefix. Resolving gives the bundle's local folder and the identity a response names.

MLflow is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)
REGISTRY_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    uri: str
    """What the user asked for, e.g. ``models:/dmoerm-demo@champion`` or a folder."""
    name: str
    """Registered model name (or the bundle folder's name)."""
    version: str
    """Registry version (``"3"``), or ``local-<created>`` for a folder."""
    path: str
    """Local folder holding ``bundle.json``."""


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@alias`` -> (NAME, alias, None); ``models:/NAME/3`` -> (NAME, None, "3")."""
    m = REGISTRY_RE.match(uri)
    if not m:
        raise ValueError(f"model URI {uri!r} must be models:/NAME@ALIAS, models:/NAME/VERSION, a folder or s3://")
    return m["name"], m["alias"], m["version"]


def registry_version(uri: str, tracking_uri: str | None) -> str:
    """The version a registry URI points at right now (an alias is looked up)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_registry_uri(uri)
    if version is not None:
        return version
    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise ValueError(f"{uri}: no such registered model or alias ({e.message})") from None


def resolve_model(uri: str, tracking_uri: str | None = None, version: str | None = None) -> ModelRef:
    """Download (or locate) the bundle ``uri`` points at. ``version`` pins the version an alias resolved to."""
    from dmoerm import storage
    from dmoerm.bundle import read_meta

    if is_registry_uri(uri):
        from dmoerm.registry import download_bundle

        name, _, _ = parse_registry_uri(uri)
        version = version or registry_version(uri, tracking_uri)
        path = download_bundle(tracking_uri, name, version)
        logger.info("resolved %s to version %s at %s", uri, version, path)
        return ModelRef(uri, name, version, str(path))
    if storage.is_s3(uri):
        import tempfile

        local = tempfile.mkdtemp(prefix="dmoerm-serve-")
        storage.download_dir(uri, local)
        path = local
    else:
        path = str(Path(uri).resolve())
        if not Path(path).is_dir():
            raise ValueError(f"model {uri!r} is neither a registry URI (models:/NAME@alias) nor a bundle folder")
    meta = read_meta(path)
    name = str(meta.get("name") or Path(uri.rstrip("/")).name)
    return ModelRef(uri, name, f"local-{meta.get('created', 'unknown')}", path)
