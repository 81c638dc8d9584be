"""load_data: npz and image folders, labels, sharding-independent determinism, seek."""

import os

import numpy as np
import pytest
import torch

from guided_diffusion.image_datasets import load_data

torch.set_num_threads(1)


def _npz(tmp_path, n=10, size=8, labels=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3
    path = str(tmp_path / "d.npz")
    np.savez(path, **({"arr_0": images, "arr_1": y} if labels else {"arr_0": images}))
    return path, images, y


def test_npz_batches_match_the_arrays(tmp_path):
    path, images, y = _npz(tmp_path)
    data = load_data(data_dir=path, batch_size=4, image_size=8, class_cond=True,
                     deterministic=True, random_flip=False, seed=0)
    x, cond = next(data)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert cond["y"].dtype == torch.int64 and cond["y"].tolist() == y[:4].tolist()
    expect = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(x, expect)
    x2, _ = next(data)  # second batch, then a new epoch (10 // 4 = 2 batches per epoch)
    x3, _ = next(data)
    assert torch.allclose(x3, x)


def test_shuffled_epoch_covers_each_image_once_and_seek_replays(tmp_path):
    path, images, y = _npz(tmp_path, n=12)
    data = load_data(data_dir=path, batch_size=4, image_size=8, class_cond=True, seed=3,
                     random_flip=False)
    batches = [next(data) for _ in range(6)]
    first_epoch = torch.cat([b[0] for b in batches[:3]])
    assert len({tuple(v.flatten().tolist()[:8]) for v in first_epoch}) == 12
    again = load_data(data_dir=path, batch_size=4, image_size=8, class_cond=True, seed=3,
                      random_flip=False)
    again.seek(4)
    x, c = next(again)
    assert torch.equal(x, batches[4][0]) and torch.equal(c["y"], batches[4][1]["y"])
    other = load_data(data_dir=path, batch_size=4, image_size=8, class_cond=True, seed=4)
    assert not torch.equal(next(other)[0], batches[0][0])


def test_npz_without_class_cond_yields_empty_cond_and_flips(tmp_path):
    path, images, _ = _npz(tmp_path, n=4, labels=False)
    data = load_data(data_dir=path, batch_size=4, image_size=8, deterministic=True, seed=0)
    x, cond = next(data)
    assert cond == {}
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for a, b in zip(x, plain):  # each image is either unchanged or mirrored
        assert torch.allclose(a, b) or torch.allclose(a, b.flip(-1))


def test_npz_resize_and_random_crop(tmp_path):
    path, _, _ = _npz(tmp_path, n=4, size=16)
    x, _ = next(load_data(data_dir=path, batch_size=2, image_size=8, seed=0))
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    x, _ = next(load_data(data_dir=path, batch_size=2, image_size=16, random_crop=True, seed=0))
    assert x.shape == (2, 3, 16, 16)


def test_bad_inputs(tmp_path):
    path, _, _ = _npz(tmp_path, labels=False)
    with pytest.raises(ValueError, match="arr_1"):
        load_data(data_dir=path, batch_size=2, image_size=8, class_cond=True)
    with pytest.raises(FileNotFoundError):
        load_data(data_dir=str(tmp_path / "missing"), batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="fewer"):
        load_data(data_dir=path, batch_size=64, image_size=8)
    with pytest.raises(ValueError):
        load_data(data_dir="", batch_size=2, image_size=8)


def test_image_folder_classes_from_file_names(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for name in ["cat_1.png", "dog_1.png", "cat_2.png", "sub/dog_2.jpg"]:
        os.makedirs(os.path.dirname(str(tmp_path / name)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / name)
    data = load_data(data_dir=str(tmp_path), batch_size=4, image_size=8, class_cond=True,
                     deterministic=True, random_flip=False, seed=0)
    x, cond = next(data)
    assert x.shape == (4, 3, 8, 8)
    assert cond["y"].tolist() == [0, 0, 1, 1]  # cat_1, cat_2, dog_1, sub/dog_2 (sorted walk)


def test_bundled_digits_npz():
    path = os.path.join(os.path.dirname(__file__), "..", "datasets", "digits32.npz")
    with np.load(path) as f:
        assert f["arr_0"].shape == (1797, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].dtype == np.int64 and sorted(set(f["arr_1"].tolist())) == list(range(10))
