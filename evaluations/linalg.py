"""Dense linear algebra for the metrics: numpy's BLAS/LAPACK for CPU tensors, torch for GPU
tensors. numpy's wheels bundle OpenBLAS, which on AMD CPUs runs float32/float64 products about
twice as fast as torch's MKL (measured on the 2-core AMD EPYC of docs/benchmarks.md), and the
plain-numpy reference implementations use it too. Inputs and outputs are tensors."""
from __future__ import annotations

import numpy as np
import torch


def _cpu(*ts) -> bool:
    return all(t.device.type == "cpu" for t in ts)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (transposed views are passed to BLAS as such, without a copy)."""
    if _cpu(a, b):
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return a @ b


def eigh(s: torch.Tensor):
    """(ascending eigenvalues, eigenvectors as columns) of a symmetric matrix."""
    if _cpu(s):
        w, v = np.linalg.eigh(s.numpy())
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(s)


def eigvalsh(s: torch.Tensor) -> torch.Tensor:
    if _cpu(s):
        return torch.from_numpy(np.linalg.eigvalsh(s.numpy()))
    return torch.linalg.eigvalsh(s)


def svdvals(a: torch.Tensor) -> torch.Tensor:
    if _cpu(a):
        return torch.from_numpy(np.linalg.svd(a.numpy(), compute_uv=False))
    return torch.linalg.svdvals(a)


def svd_thin(a: torch.Tensor):
    """(singular values, right singular vectors as rows) of the thin SVD."""
    if _cpu(a):
        _, s, vh = np.linalg.svd(a.numpy(), full_matrices=False)
        return torch.from_numpy(s), torch.from_numpy(vh)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    return s, vh
