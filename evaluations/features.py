"""Pluggable feature extractors.

EXTENSION POINT: an extractor is a ``FeatureExtractor`` subclass whose ``__call__`` maps a
uint8 NHWC numpy batch to ``{"pool": [B, D], "spatial": [B, S], "logits": [B, C]}`` float32
torch tensors (``pool`` drives FID/precision/recall, ``spatial`` sFID, ``logits`` the
Inception Score), and whose ``cache_key()`` identifies it for the reference-statistics cache
(weights hash + preprocessing + anything that changes the features). Register a factory with
``register_extractor("classifier", factory)``; ``factory(args)`` receives the parsed CLI
arguments, and ``evaluator.py --features classifier`` then uses it. A "noisy classifier at t=0"
extractor belongs in its own module that calls ``register_extractor`` and is imported from
``_load_plugins`` below.
"""
from __future__ import annotations

import hashlib

import torch

from . import inception
from .errors import EvalError


class FeatureExtractor:
    name = "base"

    def cache_key(self) -> str:
        raise NotImplementedError

    def __call__(self, images_nhwc_uint8) -> dict:
        raise NotImplementedError


def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class InceptionExtractor(FeatureExtractor):
    """The FID Inception-v3 (pool_3 / mixed_6/conv / no-bias logits)."""

    name = "inception"

    def __init__(self, weights_path=None, preprocess: str = "tf", device="cpu"):
        if preprocess not in inception.PREPROCESSINGS:
            raise EvalError(f"--preprocess must be one of {inception.PREPROCESSINGS}")
        self.weights_path = inception.resolve_weights_path(weights_path)
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.net = inception.build_inception(inception.load_state_dict(self.weights_path), self.device)
        self._key = None

    def cache_key(self) -> str:
        if self._key is None:
            self._key = f"{self.name}-{self.preprocess}-{file_sha256(self.weights_path)[:16]}"
        return self._key

    @torch.no_grad()
    def __call__(self, images_nhwc_uint8) -> dict:
        x = inception.preprocess(images_nhwc_uint8, self.preprocess, self.device)
        return self.net(x)


_REGISTRY = {}


def register_extractor(name: str, factory):
    """factory(args) -> FeatureExtractor; args = the evaluator's argparse namespace."""
    _REGISTRY[name] = factory


def available_extractors():
    _load_plugins()
    return sorted(_REGISTRY)


def build_extractor(name: str, args) -> FeatureExtractor:
    _load_plugins()
    if name not in _REGISTRY:
        raise EvalError(f"unknown --features {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](args)


def _load_plugins():
    """Import the optional extractor modules (they register themselves)."""
    from . import classifier_features  # noqa: F401


register_extractor(
    "inception",
    lambda a: InceptionExtractor(a.inception_path, a.preprocess, a.device),
)
