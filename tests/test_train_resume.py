"""Resuming image_train / classifier_train from a checkpoint reproduces the uninterrupted run:
the same per-step losses and bit-identical weights, EMA and optimizer state."""

import csv
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_npz(tmp_path_factory, size):
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("data") / f"tiny{size}.npz")
    np.savez(path, arr_0=rng.integers(0, 256, (12, size, size, 3), dtype=np.uint8),
             arr_1=np.arange(12, dtype=np.int64) % 10)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tiny_npz(tmp_path_factory, 16)


@pytest.fixture(scope="module")
def data32(tmp_path_factory):  # the classifier factory knows image sizes 32..512
    return _tiny_npz(tmp_path_factory, 32)


def _rows(log_dir, key):
    with open(os.path.join(log_dir, "progress.csv")) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _same_file(a, b):
    sa, sb = torch.load(a), torch.load(b)
    flat = lambda d: {k: v for k, v in _flatten(d)}  # noqa: E731
    fa, fb = flat(sa), flat(sb)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k], k


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


TINY_UNET = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,1 "
             "--attention_resolutions 8 --num_heads 2 --class_cond True --learn_sigma True "
             "--diffusion_steps 50 --dropout 0.1 --batch_size 4 --microbatch 2 --lr 1e-3 "
             "--ema_rate 0.9,0.99 --log_interval 1 --save_interval 2 --lr_anneal_steps 4").split()


def test_image_train_resume_matches_uninterrupted_run(data, tmp_path, monkeypatch):
    image_train = _script("image_train")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    image_train.main(TINY_UNET + ["--data_dir", data, "--log_dir", full])
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")  # OpenAI's switch: stop after a save
    image_train.main(TINY_UNET + ["--data_dir", data, "--log_dir", part])
    assert sorted(f for f in os.listdir(part) if f.endswith(".pt")) == [
        "ema_0.99_000002.pt", "ema_0.9_000002.pt", "model000002.pt", "opt000002.pt"]
    monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
    image_train.main(TINY_UNET + ["--data_dir", data, "--log_dir", part,
                                  "--resume_checkpoint", os.path.join(part, "model000002.pt")])
    a, b = _rows(full, "loss"), _rows(part, "loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    for name in ["model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt", "opt000004.pt"]:
        _same_file(os.path.join(full, name), os.path.join(part, name))


CLASSIFIER = ("--image_size 32 --classifier_width 32 --classifier_depth 1 "
              "--classifier_attention_resolutions 8 --diffusion_steps 50 --batch_size 4 "
              "--microbatch 2 --lr 1e-3 --log_interval 1 --eval_interval 2 --save_interval 2").split()


def test_classifier_train_resume_matches_uninterrupted_run(data32, tmp_path):
    data = data32
    classifier_train = _script("classifier_train")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = CLASSIFIER + ["--data_dir", data, "--val_data_dir", data]
    classifier_train.main(common + ["--iterations", "4", "--log_dir", full])
    classifier_train.main(common + ["--iterations", "2", "--log_dir", part])
    classifier_train.main(common + ["--iterations", "4", "--log_dir", part,
                                    "--resume_checkpoint", os.path.join(part, "model000002.pt")])
    for key in ["train_loss", "val_loss", "train_acc@1"]:
        a, b = _rows(full, key), _rows(part, key)
        assert a.keys() == b.keys() and len(a) >= 2
        assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a), key
    for name in ["model000004.pt", "opt000004.pt"]:
        _same_file(os.path.join(full, name), os.path.join(part, name))


def test_bad_input_is_one_error_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "image_train.py"),
                        "--data_dir", str(tmp_path / "nope.npz"), "--log_dir", str(tmp_path / "log")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: data_dir not found: {tmp_path / 'nope.npz'}"]


def test_unreadable_checkpoint_is_an_input_error(data32, tmp_path):
    data = data32
    from guided_diffusion.train_util import InputError

    bad = tmp_path / "model000002.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        _script("classifier_train").main(CLASSIFIER + [
            "--data_dir", data, "--iterations", "3", "--log_dir", str(tmp_path / "log"),
            "--resume_checkpoint", str(bad)])
