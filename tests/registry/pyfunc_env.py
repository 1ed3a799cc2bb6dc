"""Offline stand-ins for "a public index" and "a fresh environment", for checking a model's requirements.

This machine (and CI) reach no package index, so the registered model's ``requirements.txt`` is checked
against what can be built here from the interpreter's own installed distributions:

- ``stub_index``: a ``--find-links`` folder with one metadata-only wheel per installed distribution (its
  real ``Requires-Dist`` and ``Requires-Python``), at its public version (``public=True``: what PyPI
  serves, which never holds a local version such as ``+cpu``) or at its version as installed (a CPU index).
  pip's real resolver runs against it (``pip_dry_run``), with the machine's own pip configuration ignored.
- ``environment_of``: a new virtual environment (same base interpreter, no system site-packages) holding
  exactly the distributions a dry run said it would install, linked from this interpreter's copies: the
  environment a ``pip install -r requirements.txt`` would make, without the download.

What this cannot show: that those versions exist on PyPI, or that the GPU build of torch installs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

NOT_ON_AN_INDEX = {"dmoerm"}  # this repo: shipped with the model as its code, never installed from an index


def stub_index(folder: Path, *, public: bool) -> Path:
    """Metadata-only wheels of every installed distribution (but dmoerm); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if canonicalize_name(name) in NOT_ON_AN_INDEX:
            continue
        version = Version(dist.version).public if public else dist.version
        stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        if dist.metadata.get("Requires-Python"):
            lines.append(f"Requires-Python: {dist.metadata['Requires-Python']}")
        lines += [f"Provides-Extra: {e}" for e in dist.metadata.get_all("Provides-Extra") or []]
        lines += [f"Requires-Dist: {r}" for r in dist.requires or []]
        with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{stem}.dist-info/METADATA", "\n".join(lines) + "\n")
            whl.writestr(f"{stem}.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: dmoerm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            whl.writestr(f"{stem}.dist-info/RECORD", "")
    return folder


def pip_dry_run(requirements: Path, index: Path, report: Path) -> subprocess.CompletedProcess:
    """``pip install --dry-run --ignore-installed`` of ``requirements`` against ``index`` alone; pip's JSON
    report (what it would install) goes to ``report``. No pip configuration of this machine applies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--dry-run",
           "--ignore-installed", "--no-index", "--find-links", str(index), "--report", str(report), "--quiet",
           "-r", str(requirements)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def environment_of(report: Path, folder: Path) -> Path:
    """A virtual environment at ``folder`` with the distributions of a pip ``report`` (this interpreter's
    installed copies, symlinked); returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True, timeout=120)
    site = next((folder / "lib").glob("python*/site-packages"))
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    wanted = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    owners: dict[str, set[str]] = defaultdict(set)  # top-level entry of site-packages -> distributions
    for name, dist in installed.items():
        for file in dist.files or []:
            owners[file.parts[0]].add(name)
    for name in sorted(wanted):
        dist = installed[name]
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__"):  # scripts outside site-packages; caches
                continue
            # a whole folder when only wanted distributions own it, else file by file (namespace packages)
            rel = Path(top) if owners[top] <= wanted else Path(file)
            link, target = site / rel, root / rel
            if link.is_symlink() or link.exists() or not target.exists():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
    return folder / "bin" / "python"
