"""Shared by the solver tests and tests/reference/diffusers/make_reference.py: a cheap analytic
"model" and the tiny golden UNet."""

import numpy as np
import torch as th

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from reference_paths import BUNDLED


def analytic_eps(x, t):
    """A smooth, nonlinear eps(x, t) in float32 (t: raw integer timesteps, shape [B])."""
    tt = t.float().view(-1, *([1] * (x.dim() - 1))) / 1000.0
    return th.tanh(0.7 * x * (1 + tt)) + 0.3 * th.sin(3 * x + 5 * tt) + 0.2 * tt


def analytic_model(x, t, **kwargs):
    return analytic_eps(x, t)


def golden_unet(flags, weights=BUNDLED / "golden" / "pag" / "weights_unet_tiny.npz"):
    """The tiny random-weight ADM UNet of the solver and PAG goldens, with its diffusion."""
    all_flags = model_and_diffusion_defaults()
    all_flags.update(flags)
    model, diffusion = create_model_and_diffusion(**all_flags)
    state = np.load(weights)
    model.load_state_dict({k: th.from_numpy(np.array(state[k])) for k in state.files}, strict=True)
    return model.eval(), diffusion
