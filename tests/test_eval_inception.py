"""Inception port on the golden random weights, both preprocessings; weight loading."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import GOLDEN, golden  # noqa: E402

from evaluations import inception  # noqa: E402
from evaluations.errors import EvalError  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    return inception.build_inception(inception.load_state_dict(GOLDEN / "inception_weights.npz"))


@pytest.mark.parametrize("mode,tag", [("tf", "tfprep"), ("pytorch-fid", "ptfid")])
def test_inception_golden(net, mode, tag):
    z = golden("inception_64")
    x = inception.preprocess(z["in__images_uint8_nhwc"], mode)
    probe = x[0].permute(1, 2, 0)[torch.as_tensor(z["out__probe_rows"])].numpy()
    np.testing.assert_allclose(probe, z[f"out__{tag}__input_probe"], rtol=0, atol=1e-4)
    with torch.no_grad():
        out = net(x)
    for key, gkey in (("pool", "pool3"), ("logits", "logits_nobias"),
                      ("spatial", "mixed6_conv_postrelu_first7_nhwc")):
        np.testing.assert_allclose(out[key].numpy(), z[f"out__{tag}__{gkey}"], rtol=0, atol=2e-4)
    assert out["spatial"].shape == (8, 2023)


def test_state_dict_with_num_batches_tracked(tmp_path):
    sd = inception.load_state_dict(GOLDEN / "inception_weights.npz")
    assert len(sd) == 472
    net = inception.build_inception(sd)
    full = net.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in full)
    torch.save(full, tmp_path / "w.pth")
    net2 = inception.build_inception(inception.load_state_dict(tmp_path / "w.pth"))
    assert torch.equal(net2.fc.weight, net.fc.weight)


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(EvalError, match="download https://github.com/mseitzer/pytorch-fid"):
        inception.resolve_weights_path(tmp_path / "nope.pth")


def test_wrong_keys_rejected():
    with pytest.raises(EvalError, match="do not match"):
        inception.build_inception({"foo": torch.zeros(1)})


def test_legacy_resize_identity_and_upsampling():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = inception.tf_legacy_resize(x, size=8)
    # src = dst * in/out: even outputs hit input pixels exactly, the last ones clamp
    assert torch.equal(y[0, 0, ::2, ::2], x[0, 0])
    assert torch.equal(y[0, 0, -1, -1], x[0, 0, -1, -1])
    assert torch.equal(inception.tf_legacy_resize(x, size=4), x)
