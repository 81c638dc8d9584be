"""Where the reference data lives: the shared workspace's ``shared/`` folder beside the
repository when it exists (the canonical copy), else the copy committed in ``tests/reference/``
so a clean clone (CI) checks the golden vectors too.  ``SAG_ADM_SHARED`` overrides both."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKSPACE_SHARED = REPO.parent / "shared"
BUNDLED = REPO / "tests" / "reference"


def _choose():
    if os.environ.get("SAG_ADM_SHARED"):
        return Path(os.environ["SAG_ADM_SHARED"])
    if (WORKSPACE_SHARED / "golden").is_dir():
        return WORKSPACE_SHARED
    return BUNDLED


SHARED = _choose()
