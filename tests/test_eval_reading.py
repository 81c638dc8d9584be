"""Golden .npz reading cases: batches of 64, stored statistics, missing key, layouts."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import GOLDEN, golden  # noqa: E402

from evaluations import metrics  # noqa: E402
from evaluations.errors import EvalError  # noqa: E402
from evaluations.evaluator import statistics  # noqa: E402
from evaluations.npz_io import NpzImages, read_stored_statistics  # noqa: E402



def _check(reader, exp, tag):
    batches = list(reader.batches(64))
    assert reader.reader_class == str(exp[f"out__{tag}__reader_class"])
    assert [len(b) for b in batches] == list(exp[f"out__{tag}__batch_sizes"])
    assert all(b.dtype == np.uint8 for b in batches)
    assert [int(b.astype(np.int64).sum()) for b in batches] == list(exp[f"out__{tag}__batch_sums"])


def test_reading_batches(tmp_path):
    exp = golden("reading_expected")
    _check(NpzImages(GOLDEN / "reading_ref_batch.npz"), exp, "ref")
    _check(NpzImages(GOLDEN / "reading_sample_batch.npz"), exp, "sample")
    arr = np.load(GOLDEN / "reading_sample_batch.npz")["arr_0"]
    np.savez_compressed(tmp_path / "c.npz", arr)
    _check(NpzImages(tmp_path / "c.npz"), exp, "sample_compressed")
    np.savez(tmp_path / "f.npz", np.asfortranarray(arr))
    _check(NpzImages(tmp_path / "f.npz"), exp, "sample_fortran")
    # contiguous slices (MPI shards) equal the full read
    r = NpzImages(tmp_path / "c.npz")
    np.testing.assert_array_equal(np.concatenate([r.read(0, 50), r.read(50, 130)]), arr)


def test_missing_key_message():
    exp = golden("reading_expected")
    with pytest.raises(EvalError, match=str(exp["out__missing_key_error"])):
        NpzImages(GOLDEN / "reading_ref_batch.npz", key="arr_9")


def test_statistics_and_fid():
    exp = golden("reading_expected")
    acts = {"pool": exp["in__acts_pool"], "spatial": exp["in__acts_spatial"]}
    (mu, sig), (mu_s, sig_s) = statistics(GOLDEN / "reading_ref_batch.npz", acts, "cpu")
    for got, key in ((mu, "mu"), (sig, "sigma"), (mu_s, "mu_s"), (sig_s, "sigma_s")):
        want = exp[f"out__ref_stats_{key}"]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert read_stored_statistics(GOLDEN / "reading_sample_batch.npz") is None
    (smu, ssig), (smu_s, ssig_s) = statistics(GOLDEN / "reading_sample_batch.npz", acts, "cpu")
    for got, key in ((smu, "mu"), (ssig, "sigma"), (smu_s, "mu_s"), (ssig_s, "sigma_s")):
        want = exp[f"out__sample_stats_{key}"]
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    fid = metrics.frechet_distance(smu, ssig, mu, sig)
    sfid = metrics.frechet_distance(smu_s, ssig_s, mu_s, sig_s)
    assert abs(fid / float(exp["out__fid_sample_vs_ref"]) - 1) < 1e-6
    assert abs(sfid / float(exp["out__sfid_sample_vs_ref"]) - 1) < 1e-6
