"""IS / FID / precision-recall in torch, numerically matching OpenAI's evaluator.

Every function accepts numpy arrays or torch tensors (computation happens on the tensors'
device, or on ``device`` for numpy inputs) and returns Python floats. The Fréchet distance lives
in ``frechet.py``, precision/recall in ``manifold.py``; this module is the public entry point.
"""
from __future__ import annotations

import numpy as np
import torch

from . import linalg
from .tensors import as_tensor
from .frechet import CovarianceFactor, frechet_distance, trace_sqrt_product  # noqa: F401
from .manifold import (  # noqa: F401
    COL_BATCH,
    ROW_BATCH,
    _dist_block,
    manifold_radii,
    manifold_radii_reference,
    precision_recall,
    precision_recall_from_radii,
    precision_recall_from_radii_reference,
)



def compute_statistics(acts, device=None):
    """(mu, sigma) as the original: ``np.mean(acts, axis=0)`` in the activations' dtype
    (float32) and ``np.cov(acts, rowvar=False)`` (unbiased, float64). On the CPU these are
    those very numpy calls; on a GPU the same formulas in torch. Returned as numpy arrays."""
    a = as_tensor(acts, device)
    if a.device.type == "cpu":
        x = a.numpy()
        return np.mean(x, axis=0), np.cov(x, rowvar=False)
    mu = a.mean(0)
    x = a.double()
    x = x - x.mean(0, keepdim=True)
    sigma = linalg.matmul(x.t(), x) / (x.shape[0] - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def inception_score(logits, split_size: int = 5000, device=None) -> float:
    """IS from no-bias logits (pool_3 @ W), float32, consecutive splits of ``split_size``
    (the last may be shorter and counts equally); nan if a probability underflows to 0."""
    z = as_tensor(logits, device, torch.float32)
    p = torch.softmax(z, dim=1)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        kl = part * (torch.log(part) - torch.log(part.mean(0, keepdim=True)))
        scores.append(torch.exp(kl.sum(1).mean()))
    return float(torch.stack(scores).mean())
