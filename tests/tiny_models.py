"""Tiny random-weight models for fast CPU tests."""

import torch as th

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,1,1",
            attention_resolutions="32,16,8", num_heads=4, learn_sigma=True, class_cond=True,
            resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=1000)


def tiny_model_and_diffusion(seed=0, **overrides):
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    flags.update(overrides)
    th.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**flags)
    # ADM zero-initialises output layers; randomise everything so outputs and maps are non-trivial.
    with th.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(th.randn_like(p) / max(1, p[0].numel()) ** 0.5)
            else:
                p.copy_(0.1 * th.randn_like(p) + (1.0 if p.shape == () else 0.0))
    return model.eval(), diffusion
