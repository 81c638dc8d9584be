"""Build ``datasets/digits32.npz``, the training set of the bundled CPU models.

Source: scikit-learn's ``load_digits()`` (the UCI optical digits: 1797 8x8 grey images with
values 0..16, 10 classes). Method, per image:

1. scale to 0..255: ``x * 255 / 16`` (float32);
2. upsample 8x8 -> 32x32 with ``torch.nn.functional.interpolate(scale_factor=4,
   mode="bilinear", align_corners=False)``;
3. smooth lightly with the separable binomial kernel [1, 4, 6, 4, 1] / 16 (replicate padding),
   which removes the bilinear creases;
4. round, clip to 0..255, cast to uint8, replicate the grey channel to RGB.

Output: ``arr_0`` uint8 [1797, 32, 32, 3] and ``arr_1`` int64 labels (0..9), in
``load_digits()`` order. scikit-learn is needed ONLY to regenerate this file (the committed npz
is what training reads); nothing else in the project imports it.

    python scripts/prepare_digits.py [--out datasets/digits32.npz]
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


def upsample_digits(images_8x8):
    """[N, 8, 8] values 0..16 -> [N, 32, 32, 3] uint8 (steps 1-4 of the module docstring)."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
    x = x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return np.repeat(x[..., None], 3, axis=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("datasets", "digits32.npz"))
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("error: scikit-learn is needed to regenerate the digits data "
                 "(pip install scikit-learn); the committed datasets/digits32.npz needs nothing")
    digits = load_digits()
    images = upsample_digits(digits.images)
    labels = digits.target.astype(np.int64)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    np.savez_compressed(args.out, arr_0=images, arr_1=labels)
    print(f"wrote {args.out}: arr_0 {images.shape} {images.dtype}, arr_1 {labels.shape} "
          f"{labels.dtype}, class counts {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
