"""FID/sFID against scipy.linalg.sqrtm called exactly as OpenAI's evaluator calls it, on
near-singular statistics (N a little above D, N below D, dead and duplicated features, wide
eigenvalue ranges), a set against itself, and the cached reference factor."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).parent))
import eval_helpers  # noqa: E402,F401  (puts the repository on sys.path)

from evaluations import frechet  # noqa: E402
from evaluations.errors import EvalError  # noqa: E402
from evaluations.frechet import CovarianceFactor, frechet_distance  # noqa: E402
from evaluations.metrics import compute_statistics  # noqa: E402

torch.set_num_threads(1)


def openai_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """OpenAI's FIDStatistics.frechet_distance, step by step (sample = 1, reference = 2)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy >= 1.16: 'disp' deprecated, singular matrix
        covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def relu_features(rng, n, d, decades=4.0, dead=0, duplicated=0, shift=0.0):
    """Post-ReLU-like features: correlated, per-feature scales over ``decades`` decades
    (eigenvalues over twice that), ``dead`` always-zero and ``duplicated`` copied features."""
    scales = 10.0 ** (-decades * rng.rand(d))
    mix = np.eye(d) + 0.3 * rng.randn(d, d)
    x = np.maximum((rng.randn(n, d) @ mix + shift) * scales, 0)
    x[:, :dead] = 0
    if duplicated:
        x[:, dead : dead + duplicated] = x[:, d - duplicated :]
    return x.astype(np.float32)


def spatial_like(rng, n, channels=7, side=6, shift=0.0, scale_seed=0):
    """Small stand-in for the sFID features: post-ReLU, spatially smooth maps of channels with
    scales spread over decades, some channels dead in places (NHWC-flattened)."""
    scale = np.exp(1.5 * np.random.RandomState(scale_seed).randn(channels))
    coarse = rng.randn(n, channels, side // 2, side // 2)
    maps = np.repeat(np.repeat(coarse, 2, 2), 2, 3) + 0.3 * rng.randn(n, channels, side, side)
    x = np.maximum(maps * scale[None, :, None, None] - 0.8 + shift, 0)
    return x.transpose(0, 2, 3, 1).reshape(n, -1).astype(np.float32)


def _assert_matches(ours, want):
    if abs(want) < 1.0:
        assert abs(ours - want) < 1e-6, (ours, want)
    else:
        assert abs(ours - want) <= 1e-6 * abs(want), (ours, want, abs(ours / want - 1))


D = 64
CASES = {  # name: (sample rows, reference rows) from relu_features(...)
    "N_a_little_above_D": dict(n=70),
    "N_below_D": dict(n=40),
    "N_far_below_D": dict(n=12),
    "rank_deficient": dict(n=300, dead=6, duplicated=6),
    "rank_deficient_N_near_D": dict(n=68, dead=6, duplicated=6),
    "wide_eigenvalue_range": dict(n=200, decades=7.0),
    "well_conditioned": dict(n=2000, decades=0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_near_singular_pairs_match_scipy_sqrtm(case):
    rng = np.random.RandomState(sorted(CASES).index(case))
    kw = CASES[case]
    a = relu_features(rng, d=D, **kw)
    b = relu_features(rng, d=D, **{**kw, "shift": 0.2})
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    want = openai_fid(mu1, s1, mu2, s2)
    cold = frechet_distance(mu1, s1, mu2, s2)
    _assert_matches(cold, want)
    factor = CovarianceFactor.of(s2)
    assert frechet_distance(mu1, s1, mu2, s2, ref_factor=factor) == cold  # same arithmetic
    # thin factors from the activations (N <= D) and the forced exact route agree as well
    thin = CovarianceFactor.thin(a, s1)
    assert (thin is not None) == (len(a) <= D)
    _assert_matches(frechet_distance(mu1, s1, mu2, s2, ref_factor=CovarianceFactor.thin(b, s2) or factor,
                                     sample_factor=thin or CovarianceFactor.of(s1)), want)


@pytest.mark.parametrize("seed,n", [(2, 1000), (2, 4000), (0, 1000), (1, 260), (0, 100)])
def test_spatial_like_sfid_matches_scipy(seed, n):
    """Two draws of one distribution of 252 spatial-like features: small FIDs where the old
    cut-off (eigenvalues below n*eps of the squared product's largest) was off by up to 1e-4
    relative."""
    rng = np.random.RandomState(seed)
    a, b = spatial_like(rng, n, scale_seed=seed), spatial_like(rng, n, scale_seed=seed)
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    _assert_matches(frechet_distance(mu1, s1, mu2, s2, ref_factor=CovarianceFactor.of(s2)),
                    openai_fid(mu1, s1, mu2, s2))


@pytest.mark.parametrize("kind", ["relu_N_near_D", "relu_N_below_D", "dead_and_duplicated",
                                  "wide_range", "spatial_like"])
def test_set_against_itself_is_zero(kind):
    """The issue's failure: eigenvalues of the product cut at n*eps of its largest discarded
    real eigenvalues (they are squares of the covariance's), so FID(x, x) came out ~1e-3."""
    rng = np.random.RandomState(7)
    x = {"relu_N_near_D": lambda: relu_features(rng, 70, D, decades=6.0),
         "relu_N_below_D": lambda: relu_features(rng, 30, D),
         "dead_and_duplicated": lambda: relu_features(rng, 500, D, dead=8, duplicated=8),
         "wide_range": lambda: relu_features(rng, 150, D, decades=8.0),
         "spatial_like": lambda: spatial_like(rng, 260)}[kind]()
    mu, sigma = compute_statistics(x)
    factor = CovarianceFactor.thin(x, sigma) or CovarianceFactor.of(sigma)
    for ref_factor, sample_factor in ((None, None), (factor, None), (factor, factor)):
        fid = frechet_distance(mu, sigma, mu, sigma, ref_factor=ref_factor, sample_factor=sample_factor)
        assert abs(fid) < 1e-9, (kind, fid)


def test_n_far_below_d_is_exact_in_high_precision():
    """With N << D most eigenvalues of S1 S2 are 0; scipy's sqrtm turns them into round-off
    whose square roots add a small positive bias to the trace (+4e-8 relative here, more
    for larger D). Ours equals the trace computed with 25 significant digits."""
    mp = pytest.importorskip("mpmath")
    rng = np.random.RandomState(1)
    a, b = relu_features(rng, 6, 32, decades=1.0), relu_features(rng, 5, 32, decades=1.0, shift=0.05)
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    mp.mp.dps = 25
    eig = mp.eig(mp.matrix(s1.tolist()) * mp.matrix(s2.tolist()), left=False, right=False)
    exact = float(sum(mp.re(mp.sqrt(e)) for e in eig))
    for factors in ({}, {"ref_factor": CovarianceFactor.thin(b, s2),
                         "sample_factor": CovarianceFactor.thin(a, s1)}):
        tr = frechet.trace_sqrt_product(s1, s2, factors.get("ref_factor"), factors.get("sample_factor"))
        assert abs(tr - exact) <= 1e-8 * exact, (factors.keys(), tr, exact)


def test_fast_route_error_estimate_holds():
    """On the fast route's own terms: |fast - exact| never exceeds its error estimate."""
    rng = np.random.RandomState(3)
    for trial in range(12):
        d = int(rng.choice([16, 40, 64]))
        n = int(d * rng.choice([0.6, 1.1, 3.0, 20.0]))
        a = relu_features(rng, n, d, decades=float(rng.choice([0, 3, 6])), dead=d // 8 * (trial % 2))
        b = relu_features(rng, n, d, decades=2.0) if trial % 3 else a
        s1, s2 = compute_statistics(a)[1], compute_statistics(b)[1]
        b2 = CovarianceFactor.of(s2).sqrt_factor()
        s1t = torch.from_numpy(s1)
        fast, bound = frechet._fast_trace(s1t, b2)
        exact = frechet._exact_trace(CovarianceFactor.of(s1).sqrt_factor(), b2)
        assert abs(fast - exact) <= bound, (trial, fast, exact, bound)


def test_routes_are_reported_and_well_conditioned_takes_the_fast_one():
    rng = np.random.RandomState(11)
    a, b = relu_features(rng, 3000, 32, decades=0.3), relu_features(rng, 3000, 32, decades=0.3, shift=0.1)
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    info = {}
    frechet_distance(mu1, s1, mu2, s2, ref_factor=CovarianceFactor.of(s2), info=info)
    assert info["route"] == "fast" and info["fast_bound"] < 1e-8
    c = relu_features(rng, 20, 32)
    (mu3, s3) = compute_statistics(c)
    frechet_distance(mu3, s3, mu3, s3, info=info)
    assert info["route"] == "exact"  # rank 19 < 32 and FID ~ 0: the squared route is too coarse


def test_factor_round_trip_and_torch_inputs():
    rng = np.random.RandomState(5)
    a, b = relu_features(rng, 90, 24), relu_features(rng, 80, 24, shift=0.1)
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    factor = CovarianceFactor.of(s2)
    again = CovarianceFactor.from_arrays(**factor.to_arrays())
    want = frechet_distance(mu1, s1, mu2, s2, ref_factor=factor)
    assert frechet_distance(mu1, s1, mu2, s2, ref_factor=again) == want
    as_t = [torch.as_tensor(v) for v in (mu1, s1, mu2, s2)]
    assert abs(frechet_distance(*as_t) - want) <= 1e-9 * abs(want)


def test_float32_mean_term_and_sample_vs_ref_order():
    """Means from activations are float32 and the mean term is computed in float32 (quirk);
    stored float64 means promote it."""
    mu1, mu2 = np.array([0.1, 0.2], np.float32), np.array([0.3, 0.7], np.float32)
    s = np.eye(2)
    want = float(np.dot(mu1 - mu2, mu1 - mu2))  # float32 arithmetic
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(want, abs=1e-12)
    assert frechet_distance(mu1, s, mu2.astype(np.float64), s) == pytest.approx(
        float(np.dot(mu1 - mu2.astype(np.float64), mu1 - mu2.astype(np.float64))), abs=1e-15)


def test_non_finite_statistics_give_nan_with_the_original_warning():
    mu, s = np.zeros(3, np.float32), np.eye(3)
    bad = s.copy()
    bad[0, 1] = np.nan
    with pytest.warns(UserWarning, match="singular product"):
        assert np.isnan(frechet_distance(mu, bad, mu, s))
    with pytest.warns(UserWarning, match="singular product"):
        assert np.isnan(frechet_distance(mu, s, mu, bad, ref_factor=CovarianceFactor.of(bad)))


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(EvalError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(EvalError, match="same feature network"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), None,
                         ref_factor=CovarianceFactor.of(np.eye(5)))
