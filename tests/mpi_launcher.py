"""Where the tests find ``mpiexec``: beside the interpreter running them (the venv's mpich, as
scripts/setup_env.sh installs it), else on the PATH."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

MISSING_REASON = "mpiexec not found (pip install mpich, as scripts/setup_env.sh does)"


def mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def require_mpiexec() -> str:
    """The mpiexec path; skips the calling test (with the reason) where there is none."""
    found = mpiexec()
    if found is None:
        pytest.skip(MISSING_REASON)
    return found
