"""Golden metric cases: FID, IS, precision/recall against OpenAI's original outputs."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import golden, meta, recipe_rows  # noqa: E402

from evaluations import metrics  # noqa: E402

torch.set_num_threads(1)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("case", ["p_fid_basic", "p_fid_small", "p_fid_identical_small"])
def test_fid_golden(case):
    z = golden(case)
    m = meta(z)
    s, r = recipe_rows(m["sample"]), recipe_rows(m["ref"])
    mu_s, sig_s = metrics.compute_statistics(s)
    mu_r, sig_r = metrics.compute_statistics(r)
    assert mu_s.dtype == np.float32 and sig_s.dtype == np.float64
    np.testing.assert_allclose(mu_s, z["out__mu_sample"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.diag(sig_s), z["out__sigma_sample_diag"], rtol=1e-9)
    np.testing.assert_allclose(sig_r[0], z["out__sigma_ref_row0"], rtol=1e-9, atol=1e-12)
    fid = metrics.frechet_distance(mu_s, sig_s, mu_r, sig_r)
    want = float(z["out__fid"])
    assert isinstance(fid, float)
    if abs(want) < 1e-6:
        assert abs(fid - want) < 1e-6
    else:
        assert _rel(fid, want) < 1e-6
    if case == "p_fid_basic":
        return  # the torch-input path is checked on the small cases (eigh is slow on 1 core)
    fid_t = metrics.frechet_distance(*(torch.as_tensor(x) for x in (mu_s, sig_s, mu_r, sig_r)))
    assert abs(fid_t - fid) <= 1e-9 * max(1.0, abs(fid))


def test_fid_low_rank_is_finite():
    """N < D: singular covariances; the eigen route stays real and finite."""
    rng = np.random.RandomState(0)
    a, b = rng.randn(20, 64).astype(np.float32), rng.randn(30, 64).astype(np.float32) + 0.5
    fid = metrics.frechet_distance(*metrics.compute_statistics(a), *metrics.compute_statistics(b))
    assert np.isfinite(fid) and fid > 0
    mu, sig = metrics.compute_statistics(a)
    assert abs(metrics.frechet_distance(mu, sig, mu, sig)) < 1e-6


@pytest.mark.parametrize("case", ["p_is_basic", "p_is_splits500"])
def test_inception_score_golden(case):
    z = golden(case)
    m = meta(z)
    wz = golden("is_weights")
    W = wz["is_W"].astype(np.float32) * np.float32(float(wz["is_W__step"]))
    logits = recipe_rows(m["sample"]) @ W
    got = metrics.inception_score(logits, split_size=m["split_size"])
    assert isinstance(got, float)
    assert _rel(got, float(z["out__inception_score"])) < 1e-5
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits[:16]), 1).numpy(),
                               z["out__softmax_first16"], rtol=1e-4, atol=1e-7)


def test_inception_score_underflow_is_nan():
    logits = np.zeros((4, 10), np.float32)
    logits[:, 0] = 200.0
    assert np.isnan(metrics.inception_score(logits))


@pytest.mark.parametrize("case", ["p_pr_basic", "p_pr_small", "p_pr_identical_small"])
def test_precision_recall_golden(case):
    z = golden(case)
    m = meta(z)
    s, r = recipe_rows(m["sample"]), recipe_rows(m["ref"])
    p, rec = metrics.precision_recall(r, s)
    assert isinstance(p, float) and isinstance(rec, float)
    assert abs(p - float(z["out__precision"])) <= 0.001
    assert abs(rec - float(z["out__recall"])) <= 0.001
    for feats, key in ((r, "out__radii_ref"), (s, "out__radii_sample")):
        radii = metrics.manifold_radii(feats).numpy()
        np.testing.assert_allclose(radii, z[key][:, 0], rtol=5e-3)
    d = metrics._dist_block(torch.from_numpy(r[:8]), torch.from_numpy(s[:8])).numpy()
    np.testing.assert_allclose(d, z["out__dist_ref8_sample8"], rtol=5e-3, atol=1e-3)


def test_pr_fp16_overflow_falls_back_to_fp32():
    """Row norms beyond fp16's 65504 make the block non-finite: it is redone in fp32.
    (If only the u.v term overflows, max(-inf, 0) = 0 is finite and, as in the original, no
    fallback happens.)"""
    rng = np.random.RandomState(1)
    a = (rng.rand(50, 2048).astype(np.float32) * 16.0)
    d16 = metrics._dist_block(torch.from_numpy(a[:5]), torch.from_numpy(a[5:10]))
    d32 = metrics._dist_block(torch.from_numpy(a[:5]), torch.from_numpy(a[5:10]), fp16=False)
    assert torch.isfinite(d16).all()
    assert torch.equal(d16, d32)
    p, r = metrics.precision_recall(a[:25], a[25:])
    assert 0 <= p <= 1 and 0 <= r <= 1


def test_pr_block_sizes_do_not_matter_without_overflow():
    rng = np.random.RandomState(2)
    a, b = rng.randn(40, 16).astype(np.float32), rng.randn(30, 16).astype(np.float32)
    ra, rb = metrics.manifold_radii(a), metrics.manifold_radii(b)
    ra_small = metrics.manifold_radii(a, row_batch=7, col_batch=9)
    assert torch.equal(ra, ra_small)
    full = metrics.precision_recall_from_radii(a, ra, b, rb)
    small = metrics.precision_recall_from_radii(a, ra, b, rb, row_batch=7, col_batch=11)
    assert full == small
