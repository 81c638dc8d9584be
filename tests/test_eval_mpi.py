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
from evaluations import npz_io
comm = Comm()
ex = InceptionExtractor({weights!r}, "tf", "cpu")
keys = ("pool", "spatial", "logits")
images = NpzImages({images!r})
reads, plain_open = [], npz_io._open_binary

class Logged:  # logs (offset, length) of every read of this rank's pass
    def __init__(self, path):
        self.f = plain_open(path)
    def readinto(self, b):
        pos = self.f.tell()
        n = self.f.readinto(b)
        reads.append((pos, n))
        return n
    def __getattr__(self, name):
        return getattr(self.f, name)

npz_io._open_binary = Logged
out = extract(images, ex, comm, 3, "x", keys, False)
npz_io._open_binary = plain_open
all_reads = comm.gather(reads)
if comm.rank == 0:
    single = Comm.__new__(Comm)
    single._c, single.rank, single.size = _SingleComm(), 0, 1
    one = extract(NpzImages({images!r}), ex, single, 3, "x", keys, False)
    region = (images.data_offset + images.header_len, images.data_offset + images.info.file_size)
    np.savez({out!r}, size=comm.size, region=region, rank_reads=np.array(
        [(r, o, n) for r, log in enumerate(all_reads) for o, n in log], dtype=np.int64).reshape(-1, 3),
        **out, **{{"one_" + k: v for k, v in one.items()}})
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
    # the two ranks' slices: every byte of the images read exactly once in total, by one pass each
    start, stop = got["region"]
    seen = np.zeros(stop - start, np.int64)
    for rank, off, n in got["rank_reads"]:
        a, b = max(off, start), min(off + n, stop)
        seen[max(a - start, 0) : max(b - start, 0)] += 1
    assert (seen == 1).all()
    assert set(got["rank_reads"][:, 0]) == {0, 1}
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
