"""Everything an evaluation against one reference batch needs, computed once per job and
cached on disk (``cache.py``): the reference pool features (precision/recall), its statistics,
the eigendecomposition of both reference covariances (one symmetric eigenvalue problem per
sample statistic is then left for FID/sFID, see ``frechet.py``) and the k-NN radii of the
reference features (float16 and/or float32 arithmetic, whichever were computed)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .frechet import CovarianceFactor
from .manifold import manifold_radii

STAT_NAMES = ("pool", "spatial")


@dataclass
class Reference:
    pool: np.ndarray  # [N, D] float32 features of the reference images
    stats: tuple  # ((mu, sigma), (mu_s, sigma_s)) exactly as the original reads/computes them
    factors: tuple  # (CovarianceFactor of sigma, of sigma_s)
    radii: dict = field(default_factory=dict)  # "fp16"/"fp32" -> [N] float32

    @classmethod
    def build(cls, feats: dict, stats, stored: bool, device=None) -> "Reference":
        """``feats``: the reference's activations; ``stats``: its statistics, ``stored`` when
        they came from the file (then they, not the activations, define the covariances)."""
        factors = tuple(
            (None if stored else CovarianceFactor.thin(feats[name], sigma, device))
            or CovarianceFactor.of(sigma, device)
            for name, (_, sigma) in zip(STAT_NAMES, stats))
        return cls(np.asarray(feats["pool"], np.float32), stats, factors)

    def to_arrays(self) -> dict:
        (mu, sigma), (mu_s, sigma_s) = self.stats
        out = dict(pool=self.pool, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
        for name, factor in zip(STAT_NAMES, self.factors):
            out.update({f"{name}_{k}": v for k, v in factor.to_arrays().items()})
        out.update({f"radii_{mode}": np.asarray(r) for mode, r in self.radii.items()})
        return out

    @classmethod
    def from_arrays(cls, z: dict, device=None):
        """The cached entry, or None when it lacks something (then it is recomputed)."""
        needed = ["pool", "mu", "sigma", "mu_s", "sigma_s"] + [
            f"{n}_{k}" for n in STAT_NAMES for k in ("eigenvalues", "eigenvectors", "trace")]
        if any(k not in z for k in needed):
            return None
        factors = tuple(CovarianceFactor.from_arrays(z[f"{n}_eigenvalues"], z[f"{n}_eigenvectors"],
                                                     z[f"{n}_trace"], device) for n in STAT_NAMES)
        radii = {k[len("radii_"):]: z[k] for k in z if k.startswith("radii_")}
        return cls(z["pool"], ((z["mu"], z["sigma"]), (z["mu_s"], z["sigma_s"])), factors, radii)

    def manifold_radii(self, fp16: bool, device=None, progress: bool = False) -> np.ndarray:
        mode = "fp16" if fp16 else "fp32"
        if mode not in self.radii:
            self.radii[mode] = manifold_radii(self.pool, fp16=fp16, device=device,
                                              progress=progress).cpu().numpy()
        return self.radii[mode]
