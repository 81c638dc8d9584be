"""Runs that hold on clusters, end to end on a tiny model: a run SIGKILLed at each dangerous
point resumes to the byte-identical .npz, a damaged final file is repaired, a second run on a
busy directory is refused, a dead run's lock is taken over, and torchrun, srun (SLURM's
variables, no MPI) and mpiexec give the single process's bytes.  Crashes are injected with the
SAG_ADM_FAULT test hook (guided_diffusion/faults.py)."""

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guided_diffusion import dist_util
from mpi_launcher import require_mpiexec
from sampling_helpers import REPO, TINY_MODEL_FLAGS, TINY_SAMPLE_FLAGS, save_model, script_cmd, script_env, snapshot

NPZ = "samples_5x32x32x3.npz"  # TINY_SAMPLE_FLAGS: 5 samples, 3 batches of 2, 3 steps
LAUNCH_VARS = dist_util._LAUNCHER_VARS + dist_util._TORCHRUN_VARS + ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_model(tmp_path_factory.mktemp("ckpt") / "model.pt", TINY_MODEL_FLAGS))


def flags(model, out):
    return TINY_MODEL_FLAGS + TINY_SAMPLE_FLAGS + ["--model_path", model, "--output_dir", str(out), "--progress", "False"]


def env(**extra):
    base = {k: v for k, v in script_env().items() if k not in LAUNCH_VARS and not k.startswith("SAG_ADM_")}
    return dict(base, **extra)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def launch(model, out, nproc=1, **extra):
    return subprocess.run(script_cmd("image", flags(model, out), nproc), env=env(**extra), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def run_here(model, out, capsys, *extra):
    """The script's main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from guided_diffusion import logger
    from guided_diffusion.sampling import main

    code = 0
    try:
        main("image", [str(a) for a in flags(model, out) + list(extra)])
    except SystemExit as exc:
        code = exc.code
    finally:
        logger.reset()  # the run logged to this test's captured stdout and the run's files
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    ok(launch(model, out))
    return out


@pytest.fixture(scope="module")
def reference(finished_run):
    return (finished_run / NPZ).read_bytes()


def hidden_temps(out):
    return sorted(p.name for p in Path(out).rglob(".*.tmp-*"))


def assert_finished(out, reference):
    assert (out / NPZ).read_bytes() == reference
    assert not (out / "shards").exists() and not (out / "run.lock").exists() and hidden_temps(out) == []


# ------------------------------------------------------------------ SIGKILL at each point, then resume

KILL_POINTS = {
    # point: (shards left, a temp file left behind, final file present)
    "step@5": ([0], False, False),  # mid-batch 1 (3 steps per batch)
    "shard_written@2": ([0], True, False),  # batch 1's shard written, not yet renamed
    "merging": ([0, 1, 2], True, False),  # the final file half written
    "merged": ([0, 1, 2], False, True),  # final file and checksum in place, shards not yet removed
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_then_resume_gives_identical_npz(tmp_path, model, reference, point, capsys):
    out = tmp_path / "run"
    killed = launch(model, out, SAG_ADM_FAULT=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    shards, temp_left, final_there = KILL_POINTS[point]
    assert sorted(int(p.stem[6:]) for p in (out / "shards").glob("batch_*.npz")) == shards
    assert bool(hidden_temps(out)) == temp_left and (out / NPZ).exists() == final_there
    assert (out / "run.lock").exists()  # the killed run's lock is left behind...

    # ...and taken over by the resumed run (the mid-batch case resumes under mpiexec, 2 ranks).
    if point == "step@5":
        ok(launch(model, out, nproc=2))
    else:
        assert run_here(model, out, capsys)[0] == 0
    log = (out / "log.txt").read_text()
    assert "warning: taking over the lock of an earlier run (its process is gone)" in log
    assert f"{3 if final_there else len(shards)} batch(es) already done" in log
    assert_finished(out, reference)
    if point == "merged":  # a finished run re-run with the same command does nothing
        code, stdout, _ = run_here(model, out, capsys)
        assert code == 0 and "already complete" in stdout


def test_truncated_final_file_is_repaired_not_reported_complete(tmp_path, model, finished_run, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with open(out / NPZ, "r+b") as f:  # what a crash can leave of a file whose data never reached the disk
        f.truncate(len(reference) // 3)
    code, stdout, _ = run_here(model, out, capsys)
    assert code == 0 and "already complete" not in stdout
    assert f"{out / NPZ} fails verification (unreadable" in stdout
    assert "sampling its 3 missing batch(es) again" in stdout
    assert_finished(out, reference)


# ------------------------------------------------------------------ one run per directory


def wait_stopped(proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert proc.poll() is None, "the first run ended early"
        time.sleep(0.05)
    raise AssertionError("the first run never reached its pause")


def test_second_run_on_a_busy_directory_is_refused_and_the_first_finishes(tmp_path, model, reference, capsys):
    out = tmp_path / "run"
    # The first run pauses itself mid-batch (SIGSTOP): alive, holding the lock.
    first = subprocess.Popen(script_cmd("image", flags(model, out)), env=env(SAG_ADM_FAULT="step@2",
                             SAG_ADM_FAULT_MODE="stop"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(first)
        before = snapshot(out)
        for extra in ([], ["--force_unlock", "True"]):  # a live run on this host is never broken into
            code, _, stderr = run_here(model, out, capsys, *extra)
            lines = stderr.strip().splitlines()
            assert code == 1 and len(lines) == 1, stderr
            assert lines[0].startswith(f"error: output dir {out} is in use by another run (pid {first.pid} "
                                       f"on host {socket.gethostname()}, started ")
            assert lines[0].endswith("wait for it to finish or choose another --output_dir")
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_finished(out, reference)


# ------------------------------------------------------------------ launchers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_srun(model, out, nproc=2, **extra):
    """``srun -n 2 --mpi=none``: SLURM's task variables, no MPI; the store on the step's first node."""
    common = dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(nproc),
                  SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(free_port()), **extra)
    procs = [subprocess.Popen(script_cmd("image", flags(model, out)), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **common))
             for r in range(nproc)]
    return [(p.communicate(timeout=300), p.returncode) for p in procs]


def test_torchrun_srun_and_mpiexec_give_the_single_process_bytes(tmp_path, model, reference):
    mpiexec = require_mpiexec()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "torchrun": torchrun + script_cmd("image", flags(model, tmp_path / "torchrun"))[1:],
        "mpiexec": [mpiexec, "-n", "2"] + script_cmd("image", flags(model, tmp_path / "mpiexec")),
    }
    for name, cmd in runs.items():
        ok(subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300))
    for (stdout, stderr), code in fake_srun(model, tmp_path / "srun"):
        assert code == 0, stderr
    for name in ("torchrun", "mpiexec", "srun"):
        assert_finished(tmp_path / name, reference)
        log = (tmp_path / name / "log.txt").read_text()
        assert f"2 rank(s) ({'mpi' if name == 'mpiexec' else name})" in log, log
        assert (tmp_path / name / "log-rank001.txt").exists()  # rank 1 logs to its own file


@pytest.mark.parametrize("how", ["raises", "is killed"])
def test_a_failing_rank_stops_the_others(tmp_path, model, how):
    """Under srun without MPI nobody else watches the ranks: the store does.  A rank that raises
    posts an abort; one that dies silently stops its heartbeat."""
    extra = dict(SAG_ADM_FAULT="step@2", SAG_ADM_FAULT_RANK="1", SAG_ADM_PEER_TIMEOUT="3")
    if how == "raises":
        extra["SAG_ADM_FAULT_MODE"] = "raise"
    (_, rank0_err), code0 = fake_srun(model, tmp_path / "run", **extra)[0]
    assert code0 == 1
    reason = "rank 1 failed: RuntimeError: SAG_ADM_FAULT" if how == "raises" else "rank 1 stopped responding"
    assert f"error: stopping rank 0: {reason}" in rank0_err
    assert not (tmp_path / "run" / "run.lock").exists()  # rank 0 let go of the directory
