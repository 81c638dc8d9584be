"""Shared helpers for the evaluator tests (no conftest: imported explicitly)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from reference_paths import SHARED

REPO = Path(__file__).resolve().parents[1]
GOLDEN = SHARED / "golden" / "eval"
EVALUATOR = REPO / "evaluations" / "evaluator.py"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def golden(name: str):
    return np.load(GOLDEN / f"{name}.npz")


def meta(z) -> dict:
    return json.loads(str(z["meta_json"]))


def recipe_rows(recipe) -> np.ndarray:
    """Rows of a golden input recipe (see golden/eval/README.md)."""
    feats = np.load(GOLDEN / "features.npz")
    return np.concatenate([
        feats[n][a:b].astype(np.float32) * np.float32(float(feats[n + "__step"]) * m)
        for n, a, b, m in recipe
    ])


def make_random_inception(path: Path, seed: int = 0):
    """Random FID Inception whose BN running stats are calibrated on random images, so its
    features are not degenerate; saved as a pytorch-fid style .pth state dict."""
    import torch
    from evaluations.inception import random_state_dict

    torch.save(random_state_dict(seed), path)
    return path


def run_cli(args, cwd=None, launcher=(), timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([*launcher, sys.executable, str(EVALUATOR), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def parse_five_lines(stdout: str) -> list[dict]:
    """The original's five lines per sample file, as floats."""
    labels = ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:")
    lines = stdout.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith(labels[0]):
            block = lines[i : i + 5]
            assert [b.split(" ")[0] for b in block] == [l.split(" ")[0] for l in labels]
            out.append({lab: float(b[len(lab) + 1 :]) for lab, b in zip(labels, block)})
            for lab, b in zip(labels, block):
                assert b.startswith(lab + " ")
    return out
