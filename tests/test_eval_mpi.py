"""mpiexec -n 2 feature extraction and CLI results equal the 1-rank run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import REPO, make_random_inception  # noqa: E402
from mpi_launcher import MISSING_REASON, mpiexec  # noqa: E402

from evaluations import evaluator  # noqa: E402

torch.set_num_threads(1)

DRIVER = """
import sys, numpy as np, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from evaluations.dist import Comm, _SingleComm
from evaluations.evaluator import extract
from evaluations.features import InceptionExtractor
from evaluations.npz_io import NpzImages
comm = Comm()
ex = InceptionExtractor({weights!r}, "tf", "cpu")
keys = ("pool", "spatial", "logits")
out = extract(NpzImages({images!r}), ex, comm, 3, "x", keys, False)
if comm.rank == 0:
    single = Comm.__new__(Comm)
    single._c, single.rank, single.size = _SingleComm(), 0, 1
    one = extract(NpzImages({images!r}), ex, single, 3, "x", keys, False)
    np.savez({out!r}, size=comm.size, **out, **{{"one_" + k: v for k, v in one.items()}})
from evaluations import evaluator
sys.exit(evaluator.main({cli!r}))
"""


@pytest.mark.skipif(mpiexec() is None, reason=MISSING_REASON)
def test_mpi_two_ranks_equal_one(tmp_path):
    w = make_random_inception(tmp_path / "w.pth", seed=1)
    rng = np.random.RandomState(3)
    np.savez(tmp_path / "ref.npz", rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    imgs = rng.randint(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", imgs)
    np.savez(tmp_path / "s5.npz", imgs[:5])
    cli = [str(tmp_path / f) for f in ("ref.npz", "s5.npz")] + [
        "--inception_path", str(w), "--no_cache", "--batch_size", "3", "--no_progress", "--report"]
    env = {"OMP_NUM_THREADS": "1"}
    script = tmp_path / "drv.py"
    script.write_text(DRIVER.format(repo=str(REPO), weights=str(w),
                                    images=str(tmp_path / "s.npz"), out=str(tmp_path / "f.npz"),
                                    cli=cli + [str(tmp_path / "r2.json")]))
    res = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(script)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "f.npz")
    assert int(got["size"]) == 2
    for k in ("pool", "spatial", "logits"):
        assert got[k].shape == got["one_" + k].shape and len(got[k]) == 8
        np.testing.assert_allclose(got[k], got["one_" + k], rtol=1e-5, atol=1e-5)

    assert res.stdout.count("\nFID: ") == 1  # only rank 0 prints
    assert evaluator.main(cli + [str(tmp_path / "r1.json")]) == 0
    reps = {n: json.loads((tmp_path / f"r{n}.json").read_text())["results"][0] for n in (1, 2)}
    for k in ("inception_score", "fid", "sfid"):
        assert reps[2][k] == pytest.approx(reps[1][k], rel=1e-4, abs=1e-6)
    assert reps[2]["precision"] == reps[1]["precision"]
    assert reps[2]["recall"] == reps[1]["recall"]
