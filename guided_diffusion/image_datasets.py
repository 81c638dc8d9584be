"""Training data: an endless stream of ``(images NCHW in [-1, 1], {"y": labels})`` batches.

``load_data`` reads either a folder of images (OpenAI's layout: searched recursively for
jpg/jpeg/png/gif, the class is the file-name prefix before the first ``_``, sorted class names
give the indices; needs Pillow) or an ``.npz`` file with ``arr_0`` uint8 NHWC images and optional
``arr_1`` integer labels (the format sampling scripts write, e.g. ``datasets/digits32.npz``).

Each MPI rank reads its own shard (``files[rank::world]``). Unlike OpenAI's loader, the order
and the augmentations are a function of ``(seed, rank, batch index)``, so the returned stream
has ``seek(n)`` (restart at batch n): a resumed training run sees the batches an uninterrupted
run would have seen.
"""

import math
import os

import numpy as np
import torch as th

from . import dist_util

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def load_data(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False,
              random_crop=False, random_flip=True, seed=None):
    """Return an infinite, seekable iterator of batches (see the module docstring).

    ``deterministic`` keeps the file order instead of shuffling each epoch; ``random_crop``
    rescales the shorter side to a random size in [S, S/0.8] before a random SxS crop (else the
    image is resized and centre-cropped); ``random_flip`` mirrors half the images horizontally.
    Each epoch drops the last incomplete batch.
    """
    if not data_dir:
        raise ValueError("unspecified data directory")
    if not os.path.exists(data_dir):
        raise FileNotFoundError(f"data_dir not found: {data_dir}")
    rank, world = _rank_and_world()
    if os.path.isfile(data_dir):
        images, labels = _read_npz(data_dir)
        if class_cond and labels is None:
            raise ValueError(f"{data_dir} has no arr_1 labels, which --class_cond True needs")
        dataset = ArrayDataset(images[rank::world], None if not class_cond else labels[rank::world],
                               image_size, random_crop, random_flip)
    else:
        files = _list_image_files_recursively(data_dir)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {data_dir}")
        classes = None
        if class_cond:
            names = [os.path.basename(p).split("_")[0] for p in files]
            index = {name: i for i, name in enumerate(sorted(set(names)))}
            classes = [index[name] for name in names]
        dataset = ImageDataset(image_size, files, classes, shard=rank, num_shards=world,
                               random_crop=random_crop, random_flip=random_flip)
    if len(dataset) < batch_size:
        raise ValueError(f"{data_dir}: this rank's shard holds {len(dataset)} images, fewer "
                         f"than one batch of {batch_size}")
    if seed is None:
        seed = int(np.random.randint(2**31))
    return BatchStream(dataset, batch_size, seed=seed, rank=rank, shuffle=not deterministic,
                       num_workers=0 if isinstance(dataset, ArrayDataset) else 1)


def _rank_and_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return dist_util.get_rank(), dist_util.get_world_size()


def _read_npz(path):
    try:
        with np.load(path) as f:
            images = f["arr_0"]
            labels = f["arr_1"].astype(np.int64) if "arr_1" in f.files else None
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read {path} as an npz with arr_0 images: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 NHWC with 1 or 3 channels, got "
                         f"{images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images, labels


def _list_image_files_recursively(data_dir):
    out = []
    for entry in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, entry)
        if "." in entry and entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            out.append(path)
        elif os.path.isdir(path):
            out.extend(_list_image_files_recursively(path))
    return out


class BatchStream:
    """Endless batches; batch n depends only on (seed, rank, n). ``seek(n)`` restarts at n."""

    def __init__(self, dataset, batch_size, seed, rank=0, shuffle=True, num_workers=0):
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.shuffle, self.num_workers = shuffle, num_workers
        self.per_epoch = len(dataset) // batch_size
        self.position = 0
        self._it = None

    def seek(self, batch_index):
        self.position = int(batch_index)
        self._it = None

    def batch_items(self, n):
        """The ``(index, item_seed)`` pairs that make up batch ``n``."""
        epoch, k = divmod(n, self.per_epoch)
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        order = rng.permutation(len(self.dataset)) if self.shuffle else np.arange(len(self.dataset))
        item_seeds = rng.integers(0, 2**31, size=len(self.dataset))
        sl = order[k * self.batch_size:(k + 1) * self.batch_size]
        return [(int(i), int(item_seeds[i])) for i in sl]

    def _batches(self, n):
        while True:
            yield self.batch_items(n)
            n += 1

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            if self.num_workers:
                loader = th.utils.data.DataLoader(self.dataset, batch_sampler=self._batches(self.position),
                                                  num_workers=self.num_workers)
                self._it = iter(loader)
            else:
                self._it = (_collate([self.dataset[i] for i in items]) for items in self._batches(self.position))
        self.position += 1
        return next(self._it)


def _collate(items):
    x = th.from_numpy(np.stack([a for a, _ in items]))
    cond = {k: th.from_numpy(np.stack([d[k] for _, d in items])) for k in items[0][1]}
    return x, cond


def _finish(arr, label, rng, random_flip):
    """HWC float/uint8 in [0, 255] -> (CHW float32 in [-1, 1], cond dict)."""
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr.astype(np.float32) / 127.5 - 1
    cond = {} if label is None else {"y": np.array(label, dtype=np.int64)}
    return np.ascontiguousarray(np.transpose(arr, [2, 0, 1])), cond


class ArrayDataset(th.utils.data.Dataset):
    """In-memory uint8 NHWC images; items are indexed by ``(index, item_seed)``."""

    def __init__(self, images, labels, image_size, random_crop=False, random_flip=True):
        self.images, self.labels, self.image_size = images, labels, image_size
        self.random_crop, self.random_flip = random_crop, random_flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        idx, item_seed = key
        rng = np.random.default_rng(item_seed)
        arr = self.images[idx]
        h, w = arr.shape[:2]
        if self.random_crop:
            short = int(rng.integers(self.image_size, math.ceil(self.image_size / 0.8) + 1))
            arr = _resize_crop_tensor(arr, short, self.image_size, rng)
        elif (h, w) != (self.image_size, self.image_size):
            arr = _resize_crop_tensor(arr, self.image_size, self.image_size, None)
        label = None if self.labels is None else self.labels[idx]
        return _finish(arr, label, rng, self.random_flip)


def _resize_crop_tensor(arr, short, image_size, rng):
    """Resize HWC ``arr`` (bicubic, antialiased) so its shorter side is ``short``, then crop
    image_size x image_size at random (``rng``) or in the centre (``rng is None``)."""
    import torch.nn.functional as F

    h, w = arr.shape[:2]
    scale = short / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    x = th.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x[0].permute(1, 2, 0).clamp(0, 255).numpy()
    if rng is None:
        y0, x0 = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    else:
        y0, x0 = int(rng.integers(size[0] - image_size + 1)), int(rng.integers(size[1] - image_size + 1))
    return x[y0:y0 + image_size, x0:x0 + image_size]


class ImageDataset(th.utils.data.Dataset):
    """OpenAI's image-folder dataset (Pillow imported on first use)."""

    def __init__(self, resolution, image_paths, classes=None, shard=0, num_shards=1,
                 random_crop=False, random_flip=True):
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop, self.random_flip = random_crop, random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, key):
        idx, item_seed = key
        rng = np.random.default_rng(item_seed)
        from PIL import Image

        with open(self.local_images[idx], "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
        pil_image = pil_image.convert("RGB")
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        label = None if self.local_classes is None else self.local_classes[idx]
        return _finish(arr, label, rng, self.random_flip)


def center_crop_arr(pil_image, image_size):
    """Halve with BOX while the short side is >= 2S, resize it to S (BICUBIC), crop the centre."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def random_crop_arr(pil_image, image_size, rng, min_crop_frac=0.8, max_crop_frac=1.0):
    """Resize the short side to a random size in [S/max_frac, S/min_frac], crop at random."""
    from PIL import Image

    lo, hi = math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)
    short = int(rng.integers(lo, hi + 1))
    while min(*pil_image.size) >= 2 * short:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y = int(rng.integers(arr.shape[0] - image_size + 1))
    x = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[y:y + image_size, x:x + image_size]
