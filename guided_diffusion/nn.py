"""Small building blocks shared by the UNet, the classifier and the training code.

Names follow OpenAI guided-diffusion so that checkpoints and user code keep working.
"""

import math

import torch as th
import torch.nn as nn
import torch.utils.checkpoint


class SiLU(nn.SiLU):
    """Kept as a name for code written against OpenAI's module (identical to ``nn.SiLU``)."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 torso stays stable)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling layer."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def update_ema(target_params, source_params, rate=0.99):
    """target <- rate * target + (1 - rate) * source, in place."""
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def zero_module(module):
    """Zero a module's parameters and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale a module's parameters and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over every axis but the batch axis."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def normalization(channels):
    """The normalisation layer of ADM: 32-group GroupNorm in float32."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embeddings [cos | sin] of (possibly fractional) timesteps, shape [N, dim]."""
    half = dim // 2
    freqs = th.exp(
        -math.log(max_period) * th.arange(start=0, end=half, dtype=th.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """Gradient checkpointing of ``func(*inputs)`` when ``flag`` is set and gradients are needed.

    Saves activation memory during training; outputs are identical either way.
    """
    if flag and th.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
