"""FID / sFID with the semantics of OpenAI's evaluator, without a general matrix square root.

OpenAI computes ``d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr Re sqrtm(S1 @ S2)`` with
``scipy.linalg.sqrtm`` (S1 = sample, S2 = reference). The trace of the principal square root is
the sum of the square roots of the eigenvalues of S1 @ S2. For covariances (symmetric, positive
semi-definite) write ``S = B B^T`` with ``B = V sqrt(w)`` from the eigendecomposition (or, for
N <= D activations, from the thin SVD of the centred activations: ``CovarianceFactor``). Then
S1 @ S2 has the eigenvalues of the symmetric ``M = B2^T S1 B2`` and

* fast route: ``tr sqrtm(S1 S2) = sum sqrt(eigvalsh(M))`` - with S2's factor cached alongside
  the reference, one symmetric eigenvalue problem per sample statistic;
* exact route, when the fast one cannot guarantee its digits: ``M = C^T C`` with
  ``C = B1^T B2``, so the trace is ``sum svdvals(C)``. The singular values come in the
  covariances' own scale instead of squared, so eigenvalues of S1 S2 near 0 (N close to or
  below the feature dimension, dead post-ReLU features, a set against itself) keep their
  accuracy. Needs S1's factor too (its eigendecomposition, or the thin SVD for N <= D).

Round-off can leave a covariance eigenvalue slightly negative: it is clamped at 0, which is what
the real part of scipy's principal square root does with a tiny negative eigenvalue. Nothing
else is cut off (cutting eigenvalues of the squared product throws real ones away).

The fast route's error is estimated from its own eigenvalues: each has an absolute error of at
most ``delta`` = ``FAST_ROUTE_ERROR_FACTOR * eps * max|mu|`` (a symmetric eigensolver's backward
error, with a factor covering the errors of forming M; on near-singular, rank-deficient and
self cases the real error stayed below 1/30 of the estimate), so its square root is off by at
most ``sqrt(mu + delta) - sqrt(mu - delta)``. When twice the summed estimate exceeds
``FAST_ROUTE_TOLERANCE * max(1, |FID|)``, the exact route is taken.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import linalg
from .errors import EvalError
from .tensors import as_tensor

SINGULAR_PRODUCT_WARNING = (
    "fid calculation produces singular product; adding 1e-06 to diagonal of cov estimates"
)
FAST_ROUTE_TOLERANCE = 1e-7  # accepted error of the fast route, relative to max(1, |FID|)
FAST_ROUTE_ERROR_FACTOR = 16.0  # eigenvalue error of the fast route, in units of eps * |M|
_EPS = float(np.finfo(np.float64).eps)


def _symmetric(s: torch.Tensor) -> torch.Tensor:
    return (s + s.transpose(-1, -2)) / 2


@dataclass
class CovarianceFactor:
    """``sigma = V diag(w) V^T`` (w clamped at 0; V is D x r, r = D or, from N <= D activations,
    r = N) and ``trace`` = the sum of sigma's diagonal, as ``np.trace``."""

    eigenvalues: torch.Tensor  # [r] float64, >= 0
    eigenvectors: torch.Tensor  # [D, r] float64, orthonormal columns
    trace: float

    @classmethod
    def of(cls, sigma, device=None) -> "CovarianceFactor":
        s = torch.atleast_2d(as_tensor(sigma, device, torch.float64))
        if not bool(torch.isfinite(s).all()):  # kept, so that a distance against it is nan
            return cls(torch.full_like(s[0], math.nan), torch.full_like(s, math.nan), math.nan)
        w, v = linalg.eigh(_symmetric(s))
        return cls(w.clamp_min(0), v, float(torch.trace(s)))

    @classmethod
    def thin(cls, acts, sigma, device=None):
        """Factor of ``sigma = np.cov(acts)`` from the thin SVD of the centred activations when
        there are no more of them than features (cheaper than sigma's eigendecomposition, and
        exactly rank-deficient); None otherwise."""
        a = as_tensor(acts, device, torch.float64)
        n, d = a.shape
        if n > d or not bool(torch.isfinite(a).all()):
            return None
        x = (a - a.mean(0, keepdim=True)) / math.sqrt(n - 1)
        s, vh = linalg.svd_thin(x)
        return cls(s * s, vh.t(), float(np.trace(np.atleast_2d(sigma))))

    @classmethod
    def from_arrays(cls, eigenvalues, eigenvectors, trace, device=None) -> "CovarianceFactor":
        return cls(as_tensor(eigenvalues, device, torch.float64),
                   as_tensor(eigenvectors, device, torch.float64), float(trace))

    def to_arrays(self) -> dict:
        return {"eigenvalues": self.eigenvalues.cpu().numpy(),
                "eigenvectors": self.eigenvectors.cpu().numpy(),
                "trace": np.float64(self.trace)}

    @property
    def dim(self) -> int:
        return self.eigenvectors.shape[0]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.trace) and bool(torch.isfinite(self.eigenvectors).all())

    def sqrt_factor(self) -> torch.Tensor:
        """B (D x r) with B B^T = sigma."""
        return self.eigenvectors * self.eigenvalues.sqrt()


def _fast_trace(sigma1: torch.Tensor, b2: torch.Tensor):
    """sum sqrt(eig(B2^T S1 B2)) and an estimate of its rounding error (module docstring)."""
    mu = linalg.eigvalsh(_symmetric(linalg.matmul(b2.t(), linalg.matmul(sigma1, b2))))
    delta = FAST_ROUTE_ERROR_FACTOR * _EPS * float(mu.abs().max())
    pos = mu.clamp_min(0)
    bound = float(((pos + delta).sqrt() - (mu - delta).clamp_min(0).sqrt()).sum())
    return float(pos.sqrt().sum()), bound


def _exact_trace(b1: torch.Tensor, b2: torch.Tensor) -> float:
    return float(linalg.svdvals(linalg.matmul(b1.t(), b2)).sum())


def trace_sqrt_product(sigma1, sigma2=None, factor2: CovarianceFactor | None = None,
                       factor1: CovarianceFactor | None = None, mean_term: float = 0.0,
                       info: dict | None = None) -> float:
    """tr Re sqrtm(sigma1 @ sigma2) for covariances, float64. ``factor2`` (sigma2's cached
    factor) saves one eigendecomposition; ``factor1`` (sigma1's) selects the exact route
    directly; ``mean_term`` only sets the accuracy target (the FID this trace goes into).
    ``info['route']`` reports 'fast' or 'exact'."""
    dev = (factor2.eigenvalues.device if factor2 is not None
           else sigma1.device if isinstance(sigma1, torch.Tensor) else None)
    s1 = _symmetric(torch.atleast_2d(as_tensor(sigma1, dev, torch.float64)))
    f2 = factor2 if factor2 is not None else CovarianceFactor.of(sigma2, dev)
    b2 = f2.sqrt_factor()
    route, bound = "exact", math.nan
    if factor1 is None:
        tr, bound = _fast_trace(s1, b2)
        fid = mean_term + float(torch.trace(s1)) + f2.trace - 2 * tr
        if 2 * bound <= FAST_ROUTE_TOLERANCE * max(1.0, abs(fid)):
            route = "fast"
        else:
            factor1 = CovarianceFactor.of(s1)
    if route == "exact":
        tr = _exact_trace(factor1.sqrt_factor().to(dev), b2)
    if info is not None:
        info.update(route=route, fast_bound=bound)
    return tr


def frechet_distance(mu_sample, sigma_sample, mu_ref, sigma_ref, device=None,
                     ref_factor: CovarianceFactor | None = None,
                     sample_factor: CovarianceFactor | None = None,
                     info: dict | None = None) -> float:
    """FID/sFID, called sample-vs-ref like the original (``sample.frechet_distance(ref)``).

    The mean term is computed in the promoted dtype of the two means (float32 when both came
    from activations, as in the original). ``ref_factor`` / ``sample_factor``: factors of the
    covariances when known (``CovarianceFactor``; the reference's is cached). Non-finite
    statistics give nan after the original's warning (its 1e-6 diagonal retry cannot make them
    finite)."""
    dev = mu_sample.device if isinstance(mu_sample, torch.Tensor) else device
    if ref_factor is not None:
        dev = ref_factor.eigenvalues.device
    mu1, mu2 = torch.atleast_1d(as_tensor(mu_sample, dev)), torch.atleast_1d(as_tensor(mu_ref, dev))
    s1 = torch.atleast_2d(as_tensor(sigma_sample, dev, torch.float64))
    if ref_factor is None:
        ref_factor = CovarianceFactor.of(sigma_ref, dev)
    if mu1.shape != mu2.shape or s1.shape != (mu1.shape[0],) * 2 or ref_factor.dim != mu2.shape[0]:
        raise EvalError(
            f"statistics of different dimensions: sample mu {tuple(mu1.shape)} sigma "
            f"{tuple(s1.shape)}, reference mu {tuple(mu2.shape)} sigma ({ref_factor.dim}, "
            f"{ref_factor.dim}); both must come from the same feature network")
    dt = torch.promote_types(mu1.dtype, mu2.dtype)
    diff = mu1.to(dt) - mu2.to(dt)
    mean_term = float(diff @ diff)
    if not (bool(torch.isfinite(s1).all()) and ref_factor.finite):
        warnings.warn(SINGULAR_PRODUCT_WARNING)
        return math.nan
    tr_covmean = trace_sqrt_product(s1, None, ref_factor, sample_factor, mean_term, info)
    return mean_term + float(torch.trace(s1)) + ref_factor.trace - 2 * tr_covmean
