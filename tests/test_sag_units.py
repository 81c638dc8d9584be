"""Unit tests of the SAG pieces: blur, mask, column sums, probe positions, switches, RNG, errors."""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion.sag import (
    SelfAttentionGuidance,
    attention_colsum,
    attention_positions,
    find_attention_block,
    gaussian_blur,
    gaussian_kernel1d,
    map_colsum,
    sag_mask,
)
from tiny_models import tiny_model_and_diffusion


# ---------------------------------------------------------------------------- blur

@pytest.mark.parametrize("sigma", [1.0, 1.5, 3.0, 9.0])
def test_blur_equals_direct_2d_convolution(sigma):
    gen = th.Generator().manual_seed(1)
    x = th.rand(2, 3, 32, 24, generator=gen) * 2 - 1
    ours = gaussian_blur(x, sigma).numpy().astype(np.float64)
    taps = np.exp(-0.5 * (np.arange(-15, 16) / sigma) ** 2)
    taps /= taps.sum()
    kernel = np.outer(taps, taps)
    padded = np.pad(x.numpy().astype(np.float64), ((0, 0), (0, 0), (15, 15), (15, 15)), mode="reflect")
    direct = np.zeros_like(ours)
    for dy in range(31):
        for dx in range(31):
            direct += kernel[dy, dx] * padded[:, :, dy:dy + 32, dx:dx + 24]
    np.testing.assert_allclose(ours, direct, atol=2e-6)


def test_blur_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel1d(3.0)
    assert k.shape == (31,) and k.dtype == th.float32
    assert abs(float(k.sum()) - 1) < 1e-6
    assert th.equal(k, k.flip(0))


def test_blur_rejects_small_images():
    with pytest.raises(ValueError, match="larger than 15 pixels"):
        gaussian_blur(th.zeros(1, 3, 8, 8), 3.0)


# ---------------------------------------------------------------------------- column sums and mask

def brute_colsum(qkv, heads, layout):
    qkv = qkv.double().numpy()
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    out = np.zeros((b, t))
    for i in range(b):
        for h in range(heads):
            if layout == "legacy":
                base = h * 3 * ch
                q, k = qkv[i, base:base + ch], qkv[i, base + ch:base + 2 * ch]
            else:
                q, k = qkv[i, h * ch:(h + 1) * ch], qkv[i, width // 3 + h * ch: width // 3 + (h + 1) * ch]
            w = q.T @ k / math.sqrt(ch)
            w = np.exp(w - w.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            out[i] += w.sum(axis=0) / heads
    return out


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_colsum_matches_brute_force_and_chunking(layout):
    qkv = th.randn(3, 3 * 16, 64, generator=th.Generator().manual_seed(2)) * 2
    ours = attention_colsum(qkv, 4, layout)
    np.testing.assert_allclose(ours.numpy(), brute_colsum(qkv, 4, layout), atol=1e-5)
    np.testing.assert_allclose(ours.mean(dim=1).numpy(), 1.0, atol=1e-5)
    chunked = attention_colsum(qkv, 4, layout, max_elements=1)
    assert th.equal(ours, chunked)


def test_map_colsum_is_mean_over_heads_then_sum_over_queries():
    attn = th.softmax(th.randn(2 * 4, 16, 16), dim=-1)
    expected = attn.reshape(2, 4, 16, 16).mean(1).sum(1)
    assert th.equal(map_colsum(attn, 4), expected)


def test_mask_threshold_is_strict_and_upsampled_nearest():
    colsum = th.tensor([[0.5, 1.0, 1.5, 1.0000001]])
    mask = sag_mask(colsum, (1, 3, 4, 4))
    assert mask.shape == (1, 3, 4, 4) and mask.dtype == th.float32
    low = th.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = low.repeat_interleave(2, 0).repeat_interleave(2, 1)
    for c in range(3):
        assert th.equal(mask[0, c], expected)


def test_mask_rejects_non_square_maps():
    with pytest.raises(ValueError, match="not square"):
        sag_mask(th.ones(1, 12), (1, 3, 32, 32))


# ---------------------------------------------------------------------------- the probe at every position

@pytest.mark.parametrize("num_res_blocks", [2, 3])
def test_probe_at_every_valid_position(num_res_blocks):
    model, diffusion = tiny_model_and_diffusion(
        num_res_blocks=num_res_blocks, timestep_respacing="4", image_size=16, num_channels=32,
        attention_resolutions="16,8,4", channel_mult="1,1,1")
    positions = attention_positions(model)
    n_in = sum(1 for b, _ in positions if b == "input")
    n_out = sum(1 for b, _ in positions if b == "output")
    assert n_in == 3 * num_res_blocks and n_out == 3 * (num_res_blocks + 1)
    assert ("middle", 0) in positions
    x = th.randn(1, 3, 16, 16, generator=th.Generator().manual_seed(0))
    t, y = th.tensor([3]), th.tensor([1])
    for block, depth in positions:
        layer = find_attention_block(model, block, depth)
        tokens = []
        handle = layer.attention.register_forward_hook(lambda m, i, o: tokens.append(i[0].shape[-1]))
        with SelfAttentionGuidance(model, sel_attn_block=block, sel_attn_depth=depth, blur_sigma=3,
                                   keep_intermediates=True) as sag:
            with th.no_grad():
                out = diffusion.ddim_sample(model, x, t, model_kwargs={"y": y}, guidance=sag)
        handle.remove()
        assert len(tokens) == 2, "two UNet passes on a guided step"
        mask = out["sag"]["mask"]
        assert mask.shape == x.shape
        # The mask is constant on blocks of the probed map's resolution.
        factor = 16 // math.isqrt(tokens[0])
        assert th.equal(mask, mask[:, :, ::factor, ::factor].repeat_interleave(factor, 2).repeat_interleave(factor, 3))


def test_model_heads_differ_from_reference_heads_for_head_channel_models():
    model, _ = tiny_model_and_diffusion(num_head_channels=16, num_heads=4)
    reference = SelfAttentionGuidance(model, sel_attn_block="output", sel_attn_depth=8)
    true_heads = SelfAttentionGuidance(model, sel_attn_block="output", sel_attn_depth=8, sag_heads="model")
    assert reference.num_heads == 4 and true_heads.num_heads == 32 // 16
    reference.close(), true_heads.close()


# ---------------------------------------------------------------------------- switches

class CountingModel(th.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0
        self.num_heads = model.num_heads
        self.input_blocks, self.middle_block, self.output_blocks = (
            model.input_blocks, model.middle_block, model.output_blocks)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("sampler", ["p_sample_loop", "ddim_sample_loop"])
def test_scale_one_is_plain_sampling_with_one_pass(sampler):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="5")
    counting = CountingModel(model)
    noise = th.randn(2, 3, 32, 32, generator=th.Generator().manual_seed(3))
    kwargs = dict(noise=noise, model_kwargs={"y": th.tensor([0, 1])})
    th.manual_seed(5)
    plain = getattr(diffusion, sampler)(counting, (2, 3, 32, 32), **kwargs)
    plain_calls, counting.calls = counting.calls, 0
    th.manual_seed(5)
    with SelfAttentionGuidance(model, guide_scale=1.0, guide_start=1000, sel_attn_depth=8) as sag:
        same = getattr(diffusion, sampler)(counting, (2, 3, 32, 32), guidance=sag, **kwargs)
    assert plain_calls == counting.calls == 5
    assert th.equal(plain, same)


def test_guide_start_uses_respaced_indices():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="10")
    counting = CountingModel(model)
    with SelfAttentionGuidance(model, guide_scale=1.5, guide_start=4, sel_attn_depth=8, blur_sigma=3,
                               keep_intermediates=True) as sag:
        steps = list(diffusion.ddim_sample_loop_progressive(
            counting, (1, 3, 32, 32), model_kwargs={"y": th.tensor([3])}, guidance=sag))
    guided = ["sag" in s for s in steps]
    assert guided == [False] * 6 + [True] * 4  # respaced t = 9..0, guided where t < 4
    assert counting.calls == 10 + 4


def test_guide_start_zero_is_off():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="3")
    counting = CountingModel(model)
    with SelfAttentionGuidance(model, guide_start=0, sel_attn_depth=8) as sag:
        diffusion.p_sample_loop(counting, (1, 3, 32, 32), model_kwargs={"y": th.tensor([3])}, guidance=sag)
    assert counting.calls == 3


def test_probe_is_removed_after_guidance_kwargs_calls():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="2", sel_attn_block="output", sel_attn_depth=8)
    diffusion.ddim_sample_loop(model, (1, 3, 32, 32), model_kwargs={"y": th.tensor([3])},
                               guidance_kwargs={"guide_scale": 1.5, "guide_start": 2, "blur_sigma": 3})
    for module in model.modules():
        assert not module._forward_hooks


def test_guidance_kwargs_find_the_unet_behind_a_wrapper_function():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="2", sel_attn_block="output", sel_attn_depth=5)

    def model_fn(x, t, y=None):
        return model(x, t, y)

    th.manual_seed(0)
    a = diffusion.ddim_sample_loop(model_fn, (1, 3, 32, 32), model_kwargs={"y": th.tensor([3])},
                                   device=th.device("cpu"),
                                   guidance_kwargs={"guide_scale": 1.5, "guide_start": 2, "blur_sigma": 3})
    th.manual_seed(0)
    with SelfAttentionGuidance(model, sel_attn_depth=5, blur_sigma=3, guide_start=2) as sag:
        b = diffusion.ddim_sample_loop(model, (1, 3, 32, 32), model_kwargs={"y": th.tensor([3])}, guidance=sag)
    assert th.equal(a, b)


# ---------------------------------------------------------------------------- RNG stream

def test_ddpm_rng_stream_has_one_cpu_draw_per_guided_step(monkeypatch):
    """Seeded CPU runs follow the original: per guided step, one uniform draw, then randn_like."""
    import guided_diffusion.gaussian_diffusion as gd

    model, diffusion = tiny_model_and_diffusion(timestep_respacing="6")
    drawn = []
    real_randn_like = th.randn_like
    monkeypatch.setattr(gd.th, "randn_like", lambda x: drawn.append(real_randn_like(x)) or drawn[-1])
    noise = th.randn(2, 3, 32, 32, generator=th.Generator().manual_seed(4))
    th.manual_seed(11)
    with SelfAttentionGuidance(model, guide_start=3, sel_attn_depth=8, blur_sigma=3) as sag:
        diffusion.p_sample_loop(model, (2, 3, 32, 32), noise=noise, model_kwargs={"y": th.tensor([0, 1])},
                                guidance=sag)
    monkeypatch.undo()
    th.manual_seed(11)
    expected = []
    for t in range(5, -1, -1):
        if t < 3:
            th.empty(1).uniform_(3.0, 3.0)
        expected.append(th.randn(2, 3, 32, 32))
    assert len(drawn) == 6
    for got, want in zip(drawn, expected):
        assert th.equal(got, want)


# ---------------------------------------------------------------------------- errors

def test_invalid_probe_choices_list_the_valid_ones():
    model, _ = tiny_model_and_diffusion(attention_resolutions="8")  # attention only at 8x8
    with pytest.raises(ValueError, match=r"no attention layer; valid .*output 0, output 1, output 2"):
        SelfAttentionGuidance(model, sel_attn_block="output", sel_attn_depth=8)
    with pytest.raises(ValueError, match="depth out of range 0..8"):
        SelfAttentionGuidance(model, sel_attn_block="output", sel_attn_depth=9)
    with pytest.raises(ValueError, match="unknown block"):
        SelfAttentionGuidance(model, sel_attn_block="decoder", sel_attn_depth=0)


@pytest.mark.parametrize("bad", [dict(guide_scale=float("nan")), dict(guide_scale=float("inf")),
                                 dict(blur_sigma=0), dict(sag_heads="true")])
def test_invalid_guidance_settings(bad):
    model, _ = tiny_model_and_diffusion()
    with pytest.raises(ValueError):
        SelfAttentionGuidance(model, sel_attn_depth=8, **bad)
