"""Category and capability names: any printable text, checked once when the config loads, and ONE escaped
form wherever a name becomes a file or folder name, a peft adapter (a torch module key) or a metric key.

    safe_name("helpful")       -> "helpful"              plain names stay as they are (old bundles load)
    safe_name("objective QA")  -> "objective_QA-<8 hex>"  anything else: a readable stem + a hash of the name

A safe name is one path component (never ``.``, ``..``, a separator or a leading dot), a valid torch
``ModuleDict`` key (no dot, no attribute of the dict such as ``train`` or ``keys``) and never a name peft
mistakes for its own (a part of the ``lora_`` prefix, the ``value_head`` it saves per adapter).
"""

from __future__ import annotations

import functools
import hashlib
import re

MAX_LENGTH = 100
"""Longest accepted name (characters)."""
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9]+")
_PEFT_OWN = ("value_head",)  # TopStack's head, which peft's modules_to_save matches by module name
_METRIC_SAFE = re.compile(r"[\w .:-]+")  # what MLflow accepts in a metric or tag key (less its "/" separator)


def check_name(where: str, name: object, kind: str = "name") -> str:
    """``name`` if it is usable text, else a ``ValueError`` starting with ``where`` (the config field, e.g.
    ``taxonomy[1].capabilities[0]``): a non-empty string of printable characters (spaces inside are fine),
    without leading or trailing whitespace, at most :data:`MAX_LENGTH` characters."""
    if not isinstance(name, str):
        raise ValueError(f"{where}: a {kind} must be a string, got {name!r}")
    if not name:
        raise ValueError(f"{where}: a {kind} must not be empty")
    if name != name.strip():
        raise ValueError(f"{where}: {kind} {name!r} has leading or trailing whitespace")
    bad = sorted({c for c in name if not c.isprintable()})
    if bad:
        raise ValueError(f"{where}: {kind} {name!r} contains control or invisible characters "
                         f"{', '.join(f'U+{ord(c):04X}' for c in bad)}; use printable text")
    if len(name) > MAX_LENGTH:
        raise ValueError(f"{where}: {kind} {name[:40]!r}... is {len(name)} characters long; at most {MAX_LENGTH}")
    return name


def safe_name(name: str) -> str:
    """The escaped form of a (checked) name: itself when it is plain (letters, digits, ``_-``, starting with
    a letter or digit) and nothing torch or peft reserves, else ``<stem>-<hash>``: the name's letters and
    digits (runs of anything else become ``_``, at most 40) and 8 hex digits of its sha256. Deterministic;
    distinct names get distinct safe names unless the taxonomy itself spells a hash (config load checks)."""
    if _PLAIN.fullmatch(name) and name not in _reserved():
        return name
    stem = _STEM_UNSAFE.sub("_", name).strip("_")[:40].rstrip("_") or "name"
    return f"{stem}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def metric_name(name: str) -> str:
    """A name as one component of an MLflow metric or tag key (``dmoerm/acc/<name>``): itself when MLflow
    accepts it (letters, digits, ``_ .:-``, spaces; no ``/``, no ``..``), else :func:`safe_name`."""
    if _METRIC_SAFE.fullmatch(name) and ".." not in name and not name.startswith("."):
        return name
    return safe_name(name)


def check_unique(where: str, names: list[str], kind: str) -> None:
    """No two of ``names`` equal, nor share a safe name, nor differ only in case (they would share a folder
    on a case-insensitive file system): a ``ValueError`` naming ``where`` and the clash."""
    listed: set[str] = set()
    by_safe: dict[str, str] = {}
    for name in names:
        if name in listed:
            raise ValueError(f"{where}: duplicate {kind} {name!r} (listed twice)")
        listed.add(name)
        key = safe_name(name).casefold()
        if key in by_safe:
            raise ValueError(f"{where}: {kind} names {by_safe[key]!r} and {name!r} would share the file and adapter "
                             f"name {safe_name(name)!r} (they differ only in case, or one spells the other's "
                             "escaped form); rename one")
        by_safe[key] = name


@functools.lru_cache(maxsize=1)
def _reserved() -> frozenset[str]:
    """Plain names that are not safe: attributes of torch's ModuleDict / ParameterDict (peft keeps one entry
    per adapter in them, and a key that is an attribute raises KeyError), the parts of peft's ``lora_``
    prefix (peft warns that such an adapter may be re-initialised) and the modules peft saves per adapter."""
    from torch import nn

    prefix = "lora_"
    parts = {prefix[i:j] for i in range(len(prefix)) for j in range(i + 1, len(prefix) + 1)}
    return frozenset(set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict())) | parts | set(_PEFT_OWN))
