"""An mpi4py that cannot load MPI: a single process runs on; under an MPI launcher it is one
clear error line and a non-zero exit, for the samplers and for the evaluator.

mpi4py's binary wheels import fine but raise RuntimeError("cannot load MPI library") on
``from mpi4py import MPI`` when no MPI runtime is installed (a GPU image with a bare mpi4py), so
a stand-in ``mpi4py`` package that fails the same way is put first on the path.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guided_diffusion.dist_util import _LAUNCHER_VARS

REPO = Path(__file__).resolve().parents[1]

FAILURES = {
    "no MPI library": 'raise RuntimeError("cannot load MPI library\\n/x/libmpi.so: cannot open shared object file")',
    "not installed": 'raise ImportError("No module named mpi4py.MPI")',
}
REASONS = {"no MPI library": "(cannot load MPI library)", "not installed": "(No module named mpi4py.MPI)"}


def broken_mpi_env(tmp_path, failure, launcher=None):
    package = tmp_path / "fake_site" / "mpi4py"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "MPI.py").write_text(FAILURES[failure] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(package.parent), str(REPO)])
    if launcher:
        env[launcher] = "0"
    return env


def run_python(args, env, cwd):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_without_a_launcher_a_broken_mpi4py_means_one_process(tmp_path, failure):
    code = ("from guided_diffusion import dist_util, image_datasets\n"
            "dist_util.setup_dist()\n"
            "dist_util.barrier()\n"
            "print(dist_util.get_rank(), dist_util.get_world_size(), image_datasets._rank_and_world(),\n"
            "      dist_util.broadcast_object('x'))\n")
    res = run_python(["-c", code], broken_mpi_env(tmp_path, failure), tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "1", "(0,", "1)", "x"]


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("launcher", ["PMI_RANK", "OMPI_COMM_WORLD_SIZE"])
def test_sampler_under_a_launcher_with_a_broken_mpi4py_stops_with_one_line(tmp_path, failure, launcher):
    out_dir = tmp_path / "samples"
    res = run_python([str(REPO / "scripts" / "image_sample.py"), "--output_dir", str(out_dir),
                      "--model_path", str(REPO / "models" / "digits32_diffusion.pt")],
                     broken_mpi_env(tmp_path, failure, launcher), tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"error: started by an MPI launcher ({launcher} is set) but mpi4py "
                               f"cannot load MPI {REASONS[failure]}")
    assert "pip install mpich" in lines[0] and "without mpiexec" in lines[0]
    assert not out_dir.exists()  # stopped before anything was written


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_evaluator_under_a_launcher_with_a_broken_mpi4py_stops_with_one_line(tmp_path, failure):
    res = run_python([str(REPO / "evaluations" / "evaluator.py"), "ref.npz", "sample.npz"],
                     broken_mpi_env(tmp_path, failure, "PMIX_RANK"), tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"error: started by an MPI launcher (PMIX_RANK is set) but mpi4py "
                               f"cannot load MPI {REASONS[failure]}")
