"""IS / FID / precision-recall in torch, numerically matching OpenAI's evaluator.

Every function accepts numpy arrays or torch tensors (computation happens on the tensors'
device, or on ``device`` for numpy inputs) and returns Python floats.

FID choice: instead of ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` we use
``tr sqrtm(sigma1 sigma2) = sum sqrt(eig(sqrt(sigma1) sigma2 sqrt(sigma1)))`` with symmetric
eigen-decompositions in float64. The two products are similar matrices (same eigenvalues), so
the value agrees with sqrtm to ~1e-9 relative on real data, but it runs on GPU, never returns a
complex matrix and stays correct when sigma1 @ sigma2 is singular (N < feature dim), where
scipy's sqrtm may return garbage or the original raises "Imaginary component".
"""
from __future__ import annotations

import numpy as np
import torch

ROW_BATCH = 10000  # the original ManifoldEstimator's row/col block size
COL_BATCH = 10000


def _t(x, device=None, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if device is not None:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)


def compute_statistics(acts, device=None):
    """(mu, sigma) as the original: mean in the activations' dtype (float32), unbiased
    covariance in float64 (np.cov semantics). Returned as numpy arrays."""
    a = _t(acts, device)
    mu = a.mean(0)
    x = a.double()
    x = x - x.mean(0, keepdim=True)
    sigma = (x.t() @ x) / (x.shape[0] - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _clip_eigs(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off noise: below n*eps*max they are zero
    (otherwise sqrt turns 1e-16 noise into 1e-8 per eigenvalue when N < D)."""
    tol = w.abs().max() * w.numel() * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(sigma)
    return (v * _clip_eigs(w).sqrt()) @ v.t()


def trace_sqrt_product(sigma1, sigma2) -> torch.Tensor:
    """tr sqrtm(sigma1 @ sigma2) for symmetric PSD inputs, float64."""
    s1 = _sqrt_psd((sigma1 + sigma1.t()) / 2)
    m = s1 @ sigma2 @ s1
    ev = torch.linalg.eigvalsh((m + m.t()) / 2)
    return _clip_eigs(ev).sqrt().sum()


def frechet_distance(mu_sample, sigma_sample, mu_ref, sigma_ref, device=None) -> float:
    """FID/sFID, called sample-vs-ref like the original. The mean term is computed in the
    promoted dtype of the two means (float32 when both came from activations: quirk 3)."""
    dev = mu_sample.device if isinstance(mu_sample, torch.Tensor) else device
    mu1, mu2 = torch.atleast_1d(_t(mu_sample, dev)), torch.atleast_1d(_t(mu_ref, dev))
    s1 = torch.atleast_2d(_t(sigma_sample, dev, torch.float64))
    s2 = torch.atleast_2d(_t(sigma_ref, dev, torch.float64))
    if mu1.shape != mu2.shape:
        raise ValueError("Training and test mean vectors have different lengths")
    if s1.shape != s2.shape:
        raise ValueError("Training and test covariances have different dimensions")
    dt = torch.promote_types(mu1.dtype, mu2.dtype)
    diff = mu1.to(dt) - mu2.to(dt)
    mean_term = float(diff @ diff)
    tr = torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    return mean_term + float(tr)


def inception_score(logits, split_size: int = 5000, device=None) -> float:
    """IS from no-bias logits (pool_3 @ W), float32, consecutive splits of ``split_size``
    (the last may be shorter and counts equally); nan if a probability underflows to 0."""
    z = _t(logits, device, torch.float32)
    p = torch.softmax(z, dim=1)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        kl = part * (torch.log(part) - torch.log(part.mean(0, keepdim=True)))
        scores.append(torch.exp(kl.sum(1).mean()))
    return float(torch.stack(scores).mean())


# ------------------------------------------------------------ precision / recall


def _dist_block(u: torch.Tensor, v: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Squared distances as the original DistanceBlock: float16 arithmetic (emulated as
    fp32 ops rounded to fp16 after each step; products of fp16 values are exact in fp32 and
    fp32->fp16 double rounding of a single add is innocuous), recomputed in float32 when any
    entry of the fp16 block is non-finite."""
    if fp16:
        u16, v16 = u.half().float(), v.half().float()
        nu = (u16 * u16).sum(1).half().float()
        nv = (v16 * v16).sum(1).half().float()
        g2 = ((u16 @ v16.t()).half().float() * 2).half().float()
        d = ((nu[:, None] - g2).half().float() + nv[None, :]).half().float()
        d = torch.maximum(d, torch.zeros((), device=d.device))
        if bool(torch.isfinite(d).all()):
            return d
    u, v = u.float(), v.float()
    nu, nv = (u * u).sum(1), (v * v).sum(1)
    return torch.maximum(nu[:, None] - 2 * (u @ v.t()) + nv[None, :], torch.zeros((), device=u.device))


def manifold_radii(feats, k: int = 3, fp16: bool = True, device=None,
                   row_batch: int = ROW_BATCH, col_batch: int = COL_BATCH) -> torch.Tensor:
    """Squared distance to the k-th nearest point of the same set (the point itself sits at
    position 0), float32 [N]. Blocks of row_batch x col_batch decide the fp16/fp32 fallback."""
    f = _t(feats, device, torch.float32)
    out = []
    for r in range(0, len(f), row_batch):
        rows = f[r : r + row_batch]
        best = None
        for c in range(0, len(f), col_batch):
            d = _dist_block(rows, f[c : c + col_batch], fp16)
            cand = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out.append(best[:, k])
    return torch.cat(out)


def precision_recall_from_radii(ref, ref_radii, sample, sample_radii, fp16: bool = True,
                                device=None, row_batch: int = ROW_BATCH,
                                col_batch: int = COL_BATCH):
    """Distances always with ref rows / sample columns (fp16 D is not symmetric); inclusive <=."""
    r = _t(ref, device, torch.float32)
    s = _t(sample, r.device, torch.float32)
    rr, sr = _t(ref_radii, r.device).float(), _t(sample_radii, r.device).float()
    sample_in = torch.zeros(len(s), dtype=torch.bool, device=r.device)
    ref_in = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    for i in range(0, len(r), row_batch):
        for j in range(0, len(s), col_batch):
            d = _dist_block(r[i : i + row_batch], s[j : j + col_batch], fp16)
            sample_in[j : j + col_batch] |= (d <= rr[i : i + row_batch, None]).any(0)
            ref_in[i : i + row_batch] |= (d <= sr[None, j : j + col_batch]).any(1)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


def precision_recall(ref_acts, sample_acts, k: int = 3, fp16: bool = True, device=None):
    """Improved precision/recall (Kynkaanniemi et al.) exactly as OpenAI's evaluator."""
    dev = ref_acts.device if isinstance(ref_acts, torch.Tensor) else device
    ref = _t(ref_acts, dev, torch.float32)
    sample = _t(sample_acts, ref.device, torch.float32)
    return precision_recall_from_radii(
        ref, manifold_radii(ref, k, fp16), sample, manifold_radii(sample, k, fp16), fp16
    )
