"""scripts/sweep.py end to end on a tiny checkpoint: a 2x2 grid plus the baseline, killed after
its first point and resumed, evaluated in one evaluator run whose numbers must equal the
evaluator's own for each file, cached re-runs, a grown grid, figures, dry run."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from sampling_helpers import (PYTHON, REPO, TINY_CLASSIFIER_FLAGS, TINY_MODEL_FLAGS, save_classifier,
                              save_model, script_env)

SWEEP = str(REPO / "scripts" / "sweep.py")
GRID = ["--grid", "guide_scale=1.5,2", "--grid", "blur_sigma=1,3"]
FIRST = "baseline__guide_scale=1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_model(root / "model.pt", TINY_MODEL_FLAGS)
    classifier = save_classifier(root / "classifier.pt", TINY_MODEL_FLAGS + TINY_CLASSIFIER_FLAGS)
    rng = np.random.default_rng(0)
    ref = root / "ref.npz"
    np.savez(ref, rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    base = TINY_MODEL_FLAGS + TINY_CLASSIFIER_FLAGS + [
        "--model_path", str(model), "--classifier_path", str(classifier), "--timestep_respacing", "3",
        "--num_samples", "6", "--batch_size", "3", "--sel_attn_depth", "1"]
    return dict(root=root, ref=str(ref), base=base)


def sweep_cmd(setup, out, *extra, grid=GRID):
    return [PYTHON, SWEEP, "--script", "classifier", "--out", str(out), "--ref", setup["ref"],
            "--features", "classifier", "--eval_flags", f"--cache_dir {setup['root'] / 'cache'}",
            *grid, *extra, "--", *setup["base"]]


def run(cmd):
    proc = subprocess.run(cmd, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def log_runs(path):
    """How many times the sweep started a command writing to this log."""
    return sum(line.startswith("=== ") for line in open(path))


def samples_of(out, name):
    return out / "points" / name / "samples_6x32x32x3.npz"


def test_sweep_resumes_evaluates_once_and_matches_the_evaluator(setup):
    out = setup["root"] / "run"
    # 1. Kill the whole sweep (and its sampling child) once the first point is finished.
    proc = subprocess.Popen(sweep_cmd(setup, out), env=script_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = samples_of(out, FIRST)
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the first point never finished"
    first_stat = first.stat()

    # 2. --evaluate_only collects what exists (at least the first point), samples nothing.
    text = run(sweep_cmd(setup, out, "--evaluate_only"))
    assert "running" not in text and "left out" in text
    with open(out / "sweep.json") as f:
        partial = json.load(f)
    assert FIRST in [p["name"] for p in partial["points"]]

    # 3. Re-running finishes the sweep without sampling the first point again.
    text = run(sweep_cmd(setup, out))
    assert re.search(rf"\[1/5\] cached\s+{re.escape(FIRST)}", text), text
    assert log_runs(out / "logs" / f"{FIRST}.log") == 1
    assert first.stat().st_mtime_ns == first_stat.st_mtime_ns and first.stat().st_ino == first_stat.st_ino
    assert "ETA" in text and re.search(r"evaluating \d sample file\(s\) in one evaluator run \(\d+ cached\)", text)

    # 4. The sweep's tables hold the evaluator's own numbers for each point's file.
    with open(out / "sweep.json") as f:
        doc = json.load(f)
    names = [p["name"] for p in doc["points"]]
    assert names == [FIRST, "guide_scale=1.5__blur_sigma=1", "guide_scale=1.5__blur_sigma=3",
                     "guide_scale=2__blur_sigma=1", "guide_scale=2__blur_sigma=3"]
    assert doc["baseline"] == FIRST and doc["swept"] == ["guide_scale", "blur_sigma"]
    import csv

    with open(out / "sweep.csv") as f:
        csv_rows = {r["point"]: r for r in csv.DictReader(f)}
    for point in doc["points"]:  # the evaluator's command line, one file at a time
        report = setup["root"] / f"own-{point['name']}.json"
        run([PYTHON, str(REPO / "evaluations" / "evaluator.py"), setup["ref"], str(out / point["samples"]),
             "--no_progress", "--report", str(report), *doc["evaluator_flags"]])
        own = json.loads(report.read_text())["results"][0]
        assert set(doc["metrics"]) == {k for k in own if k not in ("sample", "num_samples")}
        for metric in doc["metrics"]:
            assert point["metrics"][metric] == pytest.approx(own[metric], rel=1e-9, abs=1e-12), metric
            assert float(csv_rows[point["name"]][metric]) == point["metrics"][metric]
    assert "| 1.5 | 1 | 0 |" in (out / "sweep.md").read_text()

    # 5. Figures exist and decode.
    from PIL import Image

    for name in ("fig_guide_scale.png", "fig_blur_sigma.png", "sample_sheet.png"):
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 10, name

    # 6. Same command again: nothing sampled, nothing evaluated.
    evaluations = log_runs(out / "logs" / "evaluate.log")
    text = run(sweep_cmd(setup, out))
    assert "running" not in text and text.count(" cached ") == 5 and "evaluation(s) cached" in text
    assert log_runs(out / "logs" / "evaluate.log") == evaluations

    # 7. A grown grid (more values, and a new key at the base command's value) samples only its
    #    new point, keeps the folders of the others, and evaluates only the new file.
    grown = ["--grid", "guide_scale=1.5,2,3", "--grid", "blur_sigma=3", "--grid", "sel_attn_depth=1"]
    text = run(sweep_cmd(setup, out, grid=grown))
    new = "guide_scale=3__blur_sigma=3__sel_attn_depth=1"
    assert re.findall(r"running\s+(\S+)", text) == [new], text
    assert "evaluating 1 sample file(s) in one evaluator run (3 cached)" in text
    with open(out / "sweep.json") as f:
        assert [p["dir"] for p in json.load(f)["points"]] == [
            f"points/{FIRST}", "points/guide_scale=1.5__blur_sigma=3", "points/guide_scale=2__blur_sigma=3",
            f"points/{new}"]


def test_dry_run_prints_each_command_and_writes_nothing(setup, tmp_path):
    out = tmp_path / "dry"
    text = run(sweep_cmd(setup, out, "--dry_run", "--nproc", "2", "--mpiexec", "mpiexec"))
    lines = text.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("mpiexec -n 2 ") for line in lines)
    assert all("--seed 0 " in line for line in lines)
    assert "--guide_scale 2 --blur_sigma 1 " in lines[3] and f"{out}/points/guide_scale=2__blur_sigma=1" in lines[3]
    assert not out.exists()


def test_changed_base_command_is_refused(setup, tmp_path):
    from guided_diffusion.sweep.execute import SweepFolder
    from guided_diffusion.sweep.plan import Planner, make_base

    out = tmp_path / "base"
    run(sweep_cmd(setup, out, "--dry_run"))  # a dry run records nothing
    assert not out.exists()
    earlier = Planner(make_base("", "classifier", setup["base"] + ["--num_samples", "99"]), seed=0)
    SweepFolder(out).check_base("classifier", earlier.base_args, earlier.defaults(), write=True)
    proc = subprocess.run(sweep_cmd(setup, out), env=script_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "another base command or seed (--num_samples 99 there vs 6 now)" in proc.stderr
    assert sorted(os.listdir(out)) == ["base.json"]


def test_a_failing_point_stops_the_sweep_with_the_scripts_error(setup, tmp_path):
    out = tmp_path / "fail"
    cmd = sweep_cmd(setup, out, "--no_baseline", grid=["--grid", "sel_attn_depth=7,1"])
    proc = subprocess.run(cmd, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: point sel_attn_depth=7 failed: ")
    assert "--sel_attn_depth 7" in proc.stderr and "valid (block depth) choices" in proc.stderr
    assert re.search(r"\[1/2\] failed\s+sel_attn_depth=7", proc.stdout)
    assert not (out / "points" / "sel_attn_depth=1").exists()  # stopped: the next point never ran
