"""Shared test set-up: one torch thread (CI has 2 cores), the golden-vector directory."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def golden_dir():
    path = SHARED / "golden"
    if not path.is_dir():
        pytest.skip(f"golden vectors not found at {path}")
    return path
