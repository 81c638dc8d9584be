"""The committed copy of the reference data (tests/reference/) equals the workspace's shared/
folder, when that folder exists beside the repository (it does not on a clean CI clone)."""

import filecmp

import pytest

from reference_paths import BUNDLED, WORKSPACE_SHARED

COPIED = ["golden/sag", "golden/pag", "golden/seg", "golden/eval", "golden/solvers", "spec/checkpoints"]


@pytest.mark.parametrize("folder", COPIED)
def test_committed_reference_copy_matches_shared(folder):
    canonical = WORKSPACE_SHARED / folder
    if not canonical.is_dir():
        pytest.skip(f"{canonical} not present (clean clone): the committed copy is used")
    ours = BUNDLED / folder
    names = sorted(p.name for p in canonical.iterdir() if p.is_file())
    assert sorted(p.name for p in ours.iterdir() if p.is_file()) == names
    match, mismatch, errors = filecmp.cmpfiles(canonical, ours, names, shallow=False)
    assert not mismatch and not errors, f"tests/reference/{folder} differs from shared: {mismatch + errors}"
