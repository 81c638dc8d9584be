"""Precision/recall fast path: radii and decisions equal to the straightforward float16
emulation (every block emulated in full), while emulating only a small part of the pairs."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import golden, meta, recipe_rows  # noqa: E402

from evaluations import manifold  # noqa: E402

torch.set_num_threads(1)


def _both(ref, sample, fp16=True, **blocks):
    """(fast radii, fast P/R), (reference radii, reference P/R) with the same block sizes."""
    fast_r = [manifold.manifold_radii(x, fp16=fp16, **blocks) for x in (ref, sample)]
    fast = manifold.precision_recall_from_radii(ref, fast_r[0], sample, fast_r[1], fp16=fp16, **blocks)
    kw = {k: v for k, v in blocks.items() if k in ("row_batch", "col_batch")}
    ref_r = [manifold.manifold_radii_reference(x, fp16=fp16, **kw) for x in (ref, sample)]
    slow = manifold.precision_recall_from_radii_reference(ref, ref_r[0], sample, ref_r[1], fp16=fp16, **kw)
    return (fast_r, fast), (ref_r, slow)


def _assert_equal(fast, slow):
    (fast_r, fast_pr), (ref_r, ref_pr) = fast, slow
    for a, b in zip(fast_r, ref_r):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert fast_pr == ref_pr


def _data(kind, rng):
    if kind == "uniform":  # high-dimensional concentration: many near-ties around the radii
        return rng.rand(260, 48).astype(np.float32), (rng.rand(230, 48) * 1.03).astype(np.float32)
    if kind == "quantized":  # golden-like codes * 0.125: exact GEMM, ties everywhere
        return ((rng.randint(0, 40, (260, 40)) * 0.125).astype(np.float32),
                (rng.randint(0, 42, (240, 40)) * 0.125).astype(np.float32))
    if kind == "clusters_and_duplicates":
        centres = rng.randn(12, 24)
        x = (centres[rng.randint(0, 12, 500)] + 0.02 * rng.randn(500, 24)).astype(np.float32)
        x[:40] = x[40:80]
        return x[:260], x[260:]
    if kind == "pool_like":  # non-negative, norms of a few hundred like pool_3 features
        return (np.maximum(rng.randn(300, 64) * 2 + 1, 0).astype(np.float32),
                np.maximum(rng.randn(280, 64) * 2 + 1.1, 0).astype(np.float32))
    raise KeyError(kind)


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["uniform", "quantized", "clusters_and_duplicates", "pool_like"])
def test_fast_equals_reference(kind, fp16):
    ref, sample = _data(kind, np.random.RandomState(0))
    _assert_equal(*_both(ref, sample, fp16))


@pytest.mark.parametrize("block,tile,chunk", [(100, 37, 16), (64, 64, 7), (97, 500, 128)])
def test_fast_equals_reference_across_tiles_and_chunks(block, tile, chunk):
    """Several GEMM tiles per block, tiles shared by both orientations or not (< 256 rows),
    partial last tiles, chunks that do not divide the tile."""
    ref, sample = _data("uniform", np.random.RandomState(block))
    _assert_equal(*_both(ref, sample, row_batch=block, col_batch=block, tile=tile, chunk=chunk))


def test_parallel_chunk_tasks_equal_reference():
    """With several threads the chunk passes of a tile run as concurrent tasks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        ref, sample = _data("clusters_and_duplicates", np.random.RandomState(4))
        _assert_equal(*_both(ref, sample, row_batch=300, col_batch=300, tile=300, chunk=16))
        _assert_equal(*_both(*_data("quantized", np.random.RandomState(5)), chunk=8))
    finally:
        torch.set_num_threads(threads)


def test_golden_cases_fast_equals_reference():
    for case in ("p_pr_basic", "p_pr_small", "p_pr_identical_small"):
        m = meta(golden(case))
        ref, sample = recipe_rows(m["ref"]), recipe_rows(m["sample"])
        _assert_equal(*_both(ref, sample))


def test_only_a_small_part_is_emulated(monkeypatch):
    """The point of the fast path: the float16 emulation runs on the undecided pairs only."""
    rng = np.random.RandomState(1)
    ref, sample = _data("pool_like", rng)
    ref, sample = np.concatenate([ref] * 3), np.concatenate([sample] * 3) + 0.01  # 900 x 840
    emulated = []
    original = manifold.Fp16Emulation.distance

    def counting(self, nu, nv, g):
        emulated.append(g.numel())
        return original(self, nu, nv, g)

    monkeypatch.setattr(manifold.Fp16Emulation, "distance", counting)
    manifold.precision_recall(ref, sample)
    pairs = len(ref) ** 2 + len(sample) ** 2 + len(ref) * len(sample)
    assert sum(emulated) < 0.05 * pairs, sum(emulated) / pairs


def test_overflowing_norms_take_the_reference_path_with_its_fp32_fallback():
    rng = np.random.RandomState(2)
    big = (rng.rand(120, 2048) * 16).astype(np.float32)  # |x|^2 ~ 175000 > 65504
    _assert_equal(*_both(big[:60], big[60:]))
    assert not manifold._PointSet(big, manifold.FP16).fast_ok()


def test_non_finite_features_take_the_reference_path():
    ref, sample = _data("uniform", np.random.RandomState(3))
    sample[5, 3] = np.nan
    _assert_equal(*_both(ref, sample))


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="more than k=3 points"):
        manifold.manifold_radii(np.zeros((3, 4), np.float32))


def test_tiles_are_parts_of_blocks():
    assert manifold._spans(10, 4, 3) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert manifold._spans(12000, 10000, 5000) == [(0, 5000), (5000, 10000), (10000, 12000)]
    assert manifold._spans(10001, 10000, 5000)[-1] == (10000, 10001)
