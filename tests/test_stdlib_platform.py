"""`platform/` is a source folder: it must never shadow the standard library's `platform` module."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra_path", ["", "jobs", "tuning", "platform/.."])
def test_import_platform_is_stdlib(extra_path: str) -> None:
    cwd = REPO / extra_path if extra_path else REPO
    code = (
        "import sys, sysconfig, platform, dmoerm; "
        "std = sysconfig.get_paths()['stdlib']; "
        "assert platform.__file__.startswith(std), platform.__file__; "
        "assert callable(platform.system); print('ok')"
    )
    # Both with the directory first on sys.path (as Ray puts a job's working dir) and as cwd.
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(cwd)!r}); {code}"],
                         cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_no_init_in_platform_folder() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()
