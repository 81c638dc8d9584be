"""MixedPrecisionTrainer: float32 masters, dynamic loss scaling, state_dict round trip."""

import pytest
import torch
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.fp16_util import (
    INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer, convert_module_to_f16,
)

torch.set_num_threads(1)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.torso = nn.Conv1d(4, 4, 1)
        self.norm = nn.LayerNorm(4)  # stays float32, like OpenAI's norms

    def convert_to_fp16(self):
        self.torso.apply(convert_module_to_f16)

    def forward(self, x):
        h = self.torso(x.to(self.torso.weight.dtype)[..., None])[..., 0]
        return self.norm(h.float())


def _loss(model, scale=1.0):
    x = torch.linspace(-1, 1, 8).view(2, 4)
    return (model(x) * scale).pow(2).mean()


def test_fp16_overflow_skips_steps_and_lowers_the_scale_then_grows():
    model = _Tiny()
    mp = MixedPrecisionTrainer(model=model, use_fp16=True)
    assert mp.lg_loss_scale == INITIAL_LOG_LOSS_SCALE == 20
    assert model.torso.weight.dtype == torch.float16 and model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in mp.master_params) and len(mp.master_params) == 2
    opt = torch.optim.SGD(mp.master_params, lr=0.1)
    before = [p.detach().clone() for p in mp.master_params]
    mp.zero_grad()
    mp.backward(_loss(model, scale=float("inf")))
    assert mp.optimize(opt) is False
    assert mp.lg_loss_scale == 19
    assert all(torch.equal(a, b) for a, b in zip(before, mp.master_params))
    assert all(p.grad is None for p in mp.master_params)
    mp.zero_grad()
    mp.backward(_loss(model))
    assert mp.optimize(opt) is True
    assert mp.lg_loss_scale == pytest.approx(19 + 1e-3)
    assert not torch.equal(before[1], mp.master_params[1])
    sd = mp.master_params_to_state_dict(mp.master_params)
    assert sd["torso.weight"].dtype == torch.float32
    assert torch.equal(sd["torso.weight"].half(), model.torso.weight.detach())
    again = mp.state_dict_to_master_params(sd)
    assert all(torch.equal(a, b) for a, b in zip(again, mp.master_params))
    assert "grad_norm" in logger.getkvs() and "lg_loss_scale" in logger.getkvs()
    logger.dumpkvs()


def test_fp16_unscales_gradients_before_the_step():
    ref, half = _Tiny(), _Tiny()
    mp32 = MixedPrecisionTrainer(model=ref)
    mp16 = MixedPrecisionTrainer(model=half, use_fp16=True, initial_lg_loss_scale=4)
    for mp, model in ((mp32, ref), (mp16, half)):
        mp.zero_grad()
        mp.backward(_loss(model))
        mp.optimize(torch.optim.SGD(mp.master_params, lr=0.5))
    a = mp32.master_params_to_state_dict(mp32.master_params)
    b = mp16.master_params_to_state_dict(mp16.master_params)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-3), k
    logger.dumpkvs()


def test_fp32_trainer_uses_the_model_parameters():
    model = _Tiny()
    mp = MixedPrecisionTrainer(model=model)
    assert mp.master_params == list(model.parameters())
    opt = torch.optim.SGD(mp.master_params, lr=0.1)
    mp.zero_grad()
    mp.backward(_loss(model))
    assert mp.optimize(opt) is True and mp.lg_loss_scale == INITIAL_LOG_LOSS_SCALE
    sd = mp.master_params_to_state_dict(mp.master_params)
    assert torch.equal(sd["torso.weight"], model.torso.weight.detach())
    logger.dumpkvs()
