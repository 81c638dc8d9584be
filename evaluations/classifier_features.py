"""Features from a noisy classifier at t = 0 (for the bundled digits model, or any ADM classifier).

``evaluator.py --features classifier --classifier_path models/digits32_classifier.pt
[classifier flags]`` computes FID / precision / recall in the classifier's penultimate-feature
space (the input of its final projection), sFID on its last feature map, and the accuracy of the
generated labels (``arr_1``) under the classifier. These numbers are NOT comparable to Inception
FID: the feature space is a different, much smaller network trained on different data.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import EvalError
from .features import FeatureExtractor, file_sha256, register_extractor


def _final_projection(classifier):
    """The last conv/linear layer of the classifier head (its input = penultimate features)."""
    head = classifier.out
    last = None
    for module in head.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            last = module
    if last is None:
        raise EvalError("classifier head has no projection layer")
    return last


class ClassifierExtractor(FeatureExtractor):
    name = "classifier"

    def __init__(self, args):
        from guided_diffusion.script_util import classifier_defaults, create_classifier

        if not args.classifier_path:
            raise EvalError("--features classifier needs --classifier_path (e.g. models/digits32_classifier.pt)")
        self.path = args.classifier_path
        self.device = torch.device(args.device)
        kwargs = {k: getattr(args, k) for k in classifier_defaults()}
        self.net = create_classifier(**kwargs)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise EvalError(f"{self.path}: no such classifier checkpoint")
        except Exception as exc:  # corrupt or not a checkpoint
            raise EvalError(f"{self.path}: cannot read classifier checkpoint ({type(exc).__name__})")
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError:
            raise EvalError(f"{self.path}: checkpoint does not match the classifier flags "
                            f"(check --image_size, --classifier_width/depth/attention_resolutions/pool, --num_classes)")
        self.net.to(self.device).eval()
        self.num_classes = args.num_classes
        self._captured = {}
        _final_projection(self.net).register_forward_pre_hook(self._capture_pool)
        self.net.middle_block.register_forward_hook(self._capture_spatial)
        self._key = None

    def _capture_pool(self, module, inputs):
        x = inputs[0]
        self._captured["pool"] = x[:, :, 0] if x.dim() == 3 else x.flatten(1)

    def _capture_spatial(self, module, inputs, output):
        self._captured["spatial"] = output.float().flatten(1)

    def cache_key(self) -> str:
        if self._key is None:
            self._key = f"classifier-{file_sha256(self.path)[:16]}"
        return self._key

    @torch.no_grad()
    def __call__(self, images_nhwc_uint8) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc_uint8)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        t = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
        logits = self.net(x, t).float()
        return {"pool": self._captured["pool"].float(), "spatial": self._captured["spatial"],
                "logits": logits}


def label_accuracy(logits, labels) -> float:
    """Fraction of images the classifier assigns to their generated label."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


register_extractor("classifier", ClassifierExtractor)
