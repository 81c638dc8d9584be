"""The evaluator with a noisy classifier as feature network (used by the bundled default)."""

import subprocess
import sys

import numpy as np
import torch as th

from guided_diffusion.script_util import create_classifier

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
FLAGS = ["--image_size", "32", "--classifier_width", "32", "--classifier_depth", "1",
         "--classifier_attention_resolutions", "16,8", "--num_classes", "10"]


def test_classifier_features_cli(tmp_path):
    th.manual_seed(0)
    clf = create_classifier(32, False, 32, 1, "16,8", True, True, "attention", num_classes=10)
    th.save(clf.state_dict(), tmp_path / "clf.pt")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    sample = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", ref)
    np.savez(tmp_path / "sample.npz", sample, rng.integers(0, 10, 30))
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluations" / "evaluator.py"), str(tmp_path / "ref.npz"),
         str(tmp_path / "sample.npz"), "--features", "classifier", "--classifier_path",
         str(tmp_path / "clf.pt"), "--no_cache", "--no_progress", *FLAGS],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("note: classifier features") for line in lines)
    values = {line.split(":")[0]: line.split(":")[1] for line in lines if ":" in line and not line.startswith("note")}
    for label in ("FID", "sFID", "Precision", "Recall", "Classifier accuracy"):
        float(values[label])
    assert 0 <= float(values["Classifier accuracy"]) <= 1
    assert "Accuracy" in proc.stdout  # table column


def test_classifier_features_mismatch_is_one_clear_line(tmp_path):
    th.manual_seed(0)
    clf = create_classifier(32, False, 32, 1, "16,8", True, True, "attention", num_classes=10)
    th.save(clf.state_dict(), tmp_path / "clf.pt")
    images = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "a.npz", images)
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluations" / "evaluator.py"), str(tmp_path / "a.npz"),
         str(tmp_path / "a.npz"), "--features", "classifier", "--classifier_path",
         str(tmp_path / "clf.pt"), "--no_cache", *FLAGS[:-1], "1000"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "does not match the classifier flags" in proc.stderr
    assert "Traceback" not in proc.stderr
