"""Shared test set-up: one torch thread (CI has 2 cores), the golden-vector directory
(``reference_paths``)."""

import pytest
import torch

from reference_paths import SHARED

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def golden_dir():
    path = SHARED / "golden"
    assert path.is_dir(), f"golden vectors not found at {path} (tests/reference/ is part of the repo)"
    return path
