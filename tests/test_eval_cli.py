"""evaluator.py CLI: output format, summary table, reports, cache, bad inputs."""
import csv
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import make_random_inception, parse_five_lines, run_cli  # noqa: E402

from evaluations import evaluator  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_random_inception(d / "w.pth")
    rng = np.random.RandomState(0)
    np.savez(d / "ref.npz", rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.savez(d / "s1.npz", rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.savez_compressed(d / "s2.npz", rng.randint(0, 128, (4, 32, 32, 3), dtype=np.uint8),
                        np.arange(4))
    return d


def test_cli_two_samples_table_json_and_cache(files):
    d = files
    args = ["ref.npz", "s1.npz", "s2.npz", "--inception_path", "w.pth", "--cache_dir", "cache",
            "--report", "out.json"]
    res = run_cli(args, cwd=d)
    assert res.returncode == 0, res.stderr
    blocks = parse_five_lines(res.stdout)
    assert len(blocks) == 2
    for b in blocks:
        assert all(np.isfinite(v) for v in b.values())
        assert b["Inception Score:"] >= 1.0 and 0 <= b["Precision:"] <= 1
    assert blocks[1]["FID:"] > blocks[0]["FID:"]  # darker images are further from the ref
    assert "Computing evaluations..." in res.stdout
    table = res.stdout.split("\n\n")[-1].splitlines()
    assert table[0].split() == ["sample", "IS", "FID", "sFID", "Precision", "Recall"]
    assert len(table) == 4 and table[2].startswith("s1.npz") and table[3].startswith("s2.npz")
    rep = json.loads((d / "out.json").read_text())
    assert rep["preprocess"] == "tf" and len(rep["results"]) == 2
    assert rep["results"][0]["fid"] == blocks[0]["FID:"]
    assert rep["results"][1]["recall"] == blocks[1]["Recall:"]
    entries = list((d / "cache").glob("ref-*.npz"))
    assert len(entries) == 1
    with np.load(entries[0]) as z:  # what every later evaluation against this reference needs
        assert {"pool", "mu", "sigma_s", "pool_eigenvectors", "spatial_eigenvalues",
                "radii_fp16"} <= set(z.files)
        assert z["pool_eigenvectors"].shape == (2048, 4)  # thin factor of 4 reference images
    # second run hits the cache and gives identical numbers; CSV report
    res2 = run_cli(["ref.npz", "s1.npz", "--inception_path", "w.pth", "--cache_dir", "cache",
                    "--report", "out.csv", "--no_progress"], cwd=d)
    assert res2.returncode == 0, res2.stderr
    assert "reference:" not in res2.stderr  # no reference extraction
    assert parse_five_lines(res2.stdout) == blocks[:1]
    rows = list(csv.DictReader(open(d / "out.csv")))
    assert float(rows[0]["fid"]) == blocks[0]["FID:"]


def _main_err(capsys, args):
    code = evaluator.main([str(a) for a in args] + ["--no_cache", "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs(files, tmp_path, capsys):
    d, w = files, ["--inception_path", files / "w.pth"]
    ref = d / "ref.npz"
    np.savez(tmp_path / "nokey.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    assert "missing arr_0" in _main_err(capsys, [ref, tmp_path / "nokey.npz", *w])
    np.savez(tmp_path / "f32.npz", np.zeros((4, 32, 32, 3), np.float32))
    assert "uint8" in _main_err(capsys, [ref, tmp_path / "f32.npz", *w])
    np.savez(tmp_path / "nchw.npz", np.zeros((4, 3, 32, 32), np.uint8))
    assert "NHWC" in _main_err(capsys, [ref, tmp_path / "nchw.npz", *w])
    np.savez(tmp_path / "gray.npz", np.zeros((4, 32, 32), np.uint8))
    assert "NHWC" in _main_err(capsys, [ref, tmp_path / "gray.npz", *w])
    np.savez(tmp_path / "big.npz", np.zeros((4, 64, 64, 3), np.uint8))
    assert "size mismatch" in _main_err(capsys, [ref, tmp_path / "big.npz", *w])
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    assert "cannot read" in _main_err(capsys, [ref, tmp_path / "junk.npz", *w])
    # truncated: a valid zip whose arr_0.npy is shorter than its header says
    raw = (d / "s1.npz").read_bytes()
    with zipfile.ZipFile(d / "s1.npz") as zf:
        member = zf.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "trunc.npz", "w") as zf:
        zf.writestr("arr_0.npy", member[: len(member) // 2])
    assert raw
    assert "truncated" in _main_err(capsys, [ref, tmp_path / "trunc.npz", *w])
    assert "no such file" in _main_err(capsys, [ref, tmp_path / "absent.npz", *w])
    msg = _main_err(capsys, [ref, d / "s1.npz", "--inception_path", tmp_path / "none.pth"])
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "download" in msg


def test_missing_weights_subprocess_no_traceback(files, tmp_path):
    res = run_cli([files / "ref.npz", files / "s1.npz", "--inception_path", tmp_path / "x.pth"])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "download" in res.stderr


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def _flip(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bad_inputs_one_line_and_the_cache_untouched(files, tmp_path, capsys):
    """Every bad input: one 'error:' line, exit 2, and the cache folder exactly as before -
    also when the damage shows only at the end of a pass, after the reference was computed
    (the cache entry is written only when the whole run succeeded)."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "ref-0123456789abcdef0123456789abcdef.npz").write_bytes(b"an older entry")
    before = _snapshot(cache_dir)
    rng = np.random.RandomState(1)
    imgs = rng.randint(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    bad = tmp_path / "bad"
    bad.mkdir()
    for save, tag in ((np.savez, "stored"), (np.savez_compressed, "compressed")):
        save(bad / f"{tag}.npz", imgs)
        data = (bad / f"{tag}.npz").read_bytes()
        (bad / f"truncated_{tag}.npz").write_bytes(data[: len(data) * 2 // 3])
        (bad / f"corrupt_{tag}.npz").write_bytes(data)
        _flip(bad / f"corrupt_{tag}.npz", len(data) // 2)  # inside the image data
    np.savez(bad / "float.npz", imgs.astype(np.float32))
    np.savez(bad / "rank3.npz", imgs[..., 0])
    np.savez(bad / "no_images.npz", np.zeros((0, 32, 32, 3), np.uint8))
    (bad / "zero_bytes.npz").write_bytes(b"")
    np.savez(bad / "stats_only.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048),
             mu_s=np.zeros(2023, np.float32), sigma_s=np.eye(2023))
    ref, sample = files / "ref.npz", files / "s1.npz"
    cases = {  # (reference, sample): expected words in the error line
        (ref, "truncated_stored.npz"): "truncated or corrupt",
        (ref, "truncated_compressed.npz"): "truncated or corrupt",
        (ref, "corrupt_stored.npz"): "corrupt",
        (ref, "corrupt_compressed.npz"): "corrupt",
        (ref, "float.npz"): "must be uint8",
        (ref, "rank3.npz"): "NHWC",
        (ref, "no_images.npz"): "holds no images",
        (ref, "zero_bytes.npz"): "empty file",
        ("stats_only.npz", sample): "statistics (mu, sigma, mu_s, sigma_s) but no images",
        ("corrupt_stored.npz", sample): "corrupt",
    }
    for (r, s_), words in cases.items():
        args = [bad / r if isinstance(r, str) else r, bad / s_ if isinstance(s_, str) else s_,
                "--inception_path", files / "w.pth", "--cache_dir", cache_dir, "--no_progress"]
        code = evaluator.main([str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (r, s_)
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (r, s_, err)
        assert _snapshot(cache_dir) == before, (r, s_)



def test_torchrun_without_mpi_is_refused_in_one_line(files, capsys, monkeypatch):
    """Under torchrun (no MPI) every task would evaluate everything: refused, nothing computed."""
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    for var in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    err = _main_err(capsys, [files / "ref.npz", files / "s1.npz"])
    assert "torchrun" in err and "mpiexec" in err
