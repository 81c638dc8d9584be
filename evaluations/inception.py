"""FID Inception-v3 in PyTorch (pytorch-fid architecture, our own code).

Loads the standard pytorch-fid weight file ``pt_inception-2015-12-05-6726825d.pth``
(a converted copy of TF's 2015 ``classify_image_graph_def.pb``) and returns, per image:

* ``pool``    pool_3, [N, 2048]
* ``logits``  pool_3 @ fc.weight.T, [N, 1008] -- no bias, as OpenAI's Inception Score uses
* ``spatial`` TF ``mixed_6/conv:0`` = Mixed_6d.branch1x1 post-ReLU, first 7 channels,
              NHWC-flattened -> [N, 2023] (index (h*17 + w)*7 + c)

The FID variant differs from torchvision's Inception3: every average-pool branch uses
``count_include_pad=False`` and Mixed_7c's pool branch is a MAX pool (TF graph quirks).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EvalError

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
WEIGHTS_ENV = "SAG_ADM_INCEPTION"
DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "sag-adm"
PREPROCESSINGS = ("tf", "pytorch-fid")


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Also exposes ``self.last_branch1x1`` (post-ReLU) when ``keep_branch1x1`` is set."""

    def __init__(self, cin, c7):
        super().__init__()
        self.keep_branch1x1 = False
        self.last_branch1x1 = None
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        if self.keep_branch1x1:
            self.last_branch1x1 = b1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=True`` is pytorch-fid's FIDInceptionE_2 (Mixed_7c), else FIDInceptionE_1."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Input: NCHW float already preprocessed to 299x299 in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.Mixed_6d.keep_branch1x1 = True

    def blocks(self, x):
        """Yields pytorch-fid's block outputs 0..3 (block 3 = pool_3, [N, 2048, 1, 1])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        yield x
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        yield x
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"):
            x = getattr(self, "Mixed_" + name)(x)
        yield x
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        yield F.adaptive_avg_pool2d(x, 1)

    def forward(self, x):
        *_, pool = self.blocks(x)
        pool = pool.flatten(1)
        spatial = self.Mixed_6d.last_branch1x1[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
        self.Mixed_6d.last_branch1x1 = None
        logits = pool @ self.fc.weight.t()
        return {"pool": pool, "spatial": spatial, "logits": logits}


# ---------------------------------------------------------------- preprocessing


def _legacy_axis(in_size: int, out_size: int, device):
    """TF1 ResizeBilinear index/weights, align_corners=False, half_pixel_centers=False."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo_f = torch.floor(src)
    lo = lo_f.long().clamp(0, in_size - 1)
    hi = torch.ceil(src).long().clamp(max=in_size - 1)
    return lo.to(device), hi.to(device), (src - lo_f).to(device)


def tf_legacy_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize of NCHW float32 as TF1's graph does it (no half-pixel shift)."""
    _, _, h, w = x.shape
    y0, y1, wy = _legacy_axis(h, size, x.device)
    x0, x1, wx = _legacy_axis(w, size, x.device)
    top, bot = x[:, :, y0, :], x[:, :, y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bot = bot[..., x0] + (bot[..., x1] - bot[..., x0]) * wx
    return top + (bot - top) * wy[:, None]


def preprocess(images_nhwc_uint8, mode: str = "tf", device="cpu") -> torch.Tensor:
    """uint8 NHWC batch -> NCHW float32 299x299 network input.

    ``tf``: [0,255] -> TF legacy bilinear -> (x-128)/128 (what OpenAI's evaluator feeds).
    ``pytorch-fid``: x/255 -> F.interpolate(bilinear, align_corners=False) -> 2x-1.
    """
    x = torch.as_tensor(images_nhwc_uint8).to(device).permute(0, 3, 1, 2).float()
    if mode == "tf":
        return (tf_legacy_resize(x) - 128.0) * 0.0078125
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise EvalError(f"unknown preprocessing {mode!r}; choose one of {PREPROCESSINGS}")


# ---------------------------------------------------------------- weights


def resolve_weights_path(path=None) -> Path:
    """--inception_path, else $SAG_ADM_INCEPTION, else ~/.cache/sag-adm/<file>."""
    p = Path(path or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR / WEIGHTS_FILENAME)
    p = p.expanduser()
    if not p.is_file():
        raise EvalError(
            f"Inception weights not found at {p}: download {WEIGHTS_URL} (pytorch-fid's "
            f"{WEIGHTS_FILENAME}) and put it there, or pass --inception_path / set ${WEIGHTS_ENV}"
        )
    return p


def load_state_dict(path) -> dict:
    """Reads a .pth state dict (torch.save) or an .npz with the same key names."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / wrong format
        raise EvalError(f"cannot read Inception weights {path}: {e}") from None
    if not isinstance(sd, dict):
        raise EvalError(f"{path} is not a state dict")
    return sd


def build_inception(state_dict: dict, device="cpu") -> FIDInceptionV3:
    """Strict load; ``num_batches_tracked`` entries are optional; AuxLogits are ignored."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
    net = FIDInceptionV3()
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise EvalError(
            f"Inception weights do not match the FID Inception-v3: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for k, v in expected.items():
        if k not in sd:
            sd[k] = v
    net.load_state_dict(sd, strict=True)
    return net.eval().to(device)


def random_state_dict(seed: int = 0) -> dict:
    """Random FID Inception weights whose BatchNorm running statistics are those of a few
    random images, so the features are not degenerate. For tests and timing only: these are
    not the Inception weights, and numbers made with them mean nothing."""
    import numpy as np

    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: running stats = this batch's stats
    images = np.random.RandomState(seed).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    net.train()
    with torch.no_grad():
        net(preprocess(images, "tf"))
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
