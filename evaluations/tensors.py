"""numpy-or-torch inputs for the metric functions."""
from __future__ import annotations

import numpy as np
import torch


def as_tensor(x, device=None, dtype=None) -> torch.Tensor:
    """``x`` as a tensor (no copy when already one), moved to ``device`` and cast to ``dtype``
    when they are given."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if device is not None:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)
