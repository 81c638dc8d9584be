"""PAG / SEG beyond the golden cases: the guided step (DDPM, DDIM, with and without classifier
guidance) against a literal implementation of the original's step, x_0- and x_{t-1}-predicting
models (SAG fixed too), the window and step hints, one pass at scale 1, the SEG kernel rule,
layer choice, restoring the model, and the errors."""

import functools
import math

import numpy as np
import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.guidance import TwoPassGuidance
from guided_diffusion.pag import (
    MASK,
    PAG,
    SEG,
    PerturbedAttention,
    PerturbedAttentionGuidance,
    attention_layers,
    parse_strategies,
    perturbed_attention,
    seg_blur_queries,
    seg_kernel_size,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.sag import SelfAttentionGuidance, degrade
from tiny_models import tiny_model_and_diffusion

LAYERS = ["input_blocks.7.1", "middle_block.1"]  # 8x8 blocks
Y = th.tensor([3, 7])


@functools.lru_cache(maxsize=None)
def tiny(**overrides):
    """The tiny test UNet with attention at 16x16 and 8x8 only (fast), built once per setting.
    Tests never change it (perturbations and probes are undone)."""
    return tiny_model_and_diffusion(**dict(dict(attention_resolutions="16,8"), **overrides))


def inputs(seed=0):
    gen = th.Generator().manual_seed(seed)
    return th.randn(2, 3, 32, 32, generator=gen), th.tensor([6, 6])


def coef(diffusion, name, t, shape=(2, 3, 32, 32)):
    """A float64 table of the diffusion at t, as float32 broadcast to ``shape``."""
    value = th.from_numpy(np.asarray(getattr(diffusion, name) if isinstance(name, str) else name))[t]
    return value.float().view(-1, 1, 1, 1).expand(shape)


def eps_from_x0(diffusion, x, t, x0):
    return (coef(diffusion, "sqrt_recip_alphas_cumprod", t) * x - x0) / coef(diffusion, "sqrt_recipm1_alphas_cumprod", t)


def x0_from_eps(diffusion, x, t, eps):
    return coef(diffusion, "sqrt_recip_alphas_cumprod", t) * x - coef(diffusion, "sqrt_recipm1_alphas_cumprod", t) * eps


def raw_output(model, diffusion, x, t, y):
    return model(x, th.tensor(diffusion.timestep_map)[t], y)


def pass_eps_literal(diffusion, out, x, t):
    """The original's ``out['eps']``: eps itself, from the raw x_0 (START_X), or from the clipped
    x_0 of x_{t-1} (PREVIOUS_X)."""
    pred = out[:, :3]
    if diffusion.model_mean_type == gd.ModelMeanType.EPSILON:
        return pred
    if diffusion.model_mean_type == gd.ModelMeanType.START_X:
        return eps_from_x0(diffusion, x, t, pred)
    x0 = (pred - coef(diffusion, "posterior_mean_coef2", t) * x) / coef(diffusion, "posterior_mean_coef1", t)
    return eps_from_x0(diffusion, x, t, x0.clamp(-1, 1))


def literal_step(diffusion, model, x, t, perturbation, scale, sampler, cond_fn=None, seed=5):
    """The PAG code's guided p_sample / ddim_sample (eta 0), written out from its formulas."""
    th.manual_seed(seed)
    out1 = raw_output(model, diffusion, x, t, Y)
    with perturbation():
        out2 = raw_output(model, diffusion, x, t, Y)
    eps1, eps2 = pass_eps_literal(diffusion, out1, x, t), pass_eps_literal(diffusion, out2, x, t)
    x0 = x0_from_eps(diffusion, x, t, eps2 + scale * (eps1 - eps2)).clamp(-1, 1)
    raw_t = th.tensor(diffusion.timestep_map)[t]
    if sampler == "ddpm":
        frac = (out1[:, 3:] + 1) / 2  # learned range, from the unperturbed pass
        log_var = frac * coef(diffusion, np.log(diffusion.betas), t) + (1 - frac) * coef(
            diffusion, "posterior_log_variance_clipped", t)
        mean = coef(diffusion, "posterior_mean_coef1", t) * x0 + coef(diffusion, "posterior_mean_coef2", t) * x
        noise = th.randn_like(x)
        if cond_fn is not None:
            mean = mean + th.exp(log_var) * cond_fn(x, raw_t, y=Y)
        return mean + th.exp(0.5 * log_var) * noise
    if cond_fn is not None:
        alpha_bar = coef(diffusion, "alphas_cumprod", t)
        eps = eps_from_x0(diffusion, x, t, x0) - (1 - alpha_bar).sqrt() * cond_fn(x, raw_t, y=Y)
        x0 = x0_from_eps(diffusion, x, t, eps)  # not clipped again
    eps = eps_from_x0(diffusion, x, t, x0)
    prev = coef(diffusion, "alphas_cumprod_prev", t)
    th.randn_like(x)
    return x0 * th.sqrt(prev) + th.sqrt(1 - prev) * eps


def toy_cond_fn(x, t, y=None):
    """A stand-in classifier gradient that depends on x, t and y."""
    return 0.1 * th.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000) * (1 + y.float().view(-1, 1, 1, 1) / 10)


@pytest.mark.parametrize("strategy", [PAG, SEG])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("classifier", [False, True])
def test_guided_step_is_the_originals_step(strategy, sampler, classifier):
    model, diffusion = tiny(timestep_respacing="10")
    x, t = inputs()
    settings = dict(strategy=strategy, seg_sigma=2.0) if strategy == SEG else dict(strategy=strategy)
    guidance = PerturbedAttentionGuidance(model, guide_scale=3.0, drop_layers=LAYERS, **settings)
    cond_fn = toy_cond_fn if classifier else None
    th.manual_seed(5)
    with th.no_grad():
        if sampler == "ddpm":
            ours = diffusion.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs={"y": Y}, guidance=guidance)
        else:
            ours = diffusion.ddim_sample(model, x, t, cond_fn=cond_fn, model_kwargs={"y": Y}, guidance=guidance)
        expected = literal_step(diffusion, model, x, t, guidance.perturbation, 3.0, sampler, cond_fn)
    np.testing.assert_allclose(ours["sample"].numpy(), expected.numpy(), atol=2e-5)


@pytest.mark.parametrize("mean_type", ["START_X", "PREVIOUS_X"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pag_guides_the_eps_of_x0_and_xprev_models(mean_type, sampler):
    model, _ = tiny()
    diffusion = SpacedDiffusion(use_timesteps=space_timesteps(1000, "10"),
                                betas=gd.get_named_beta_schedule("linear", 1000),
                                model_mean_type=gd.ModelMeanType[mean_type],
                                model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)
    x, t = inputs(1)
    guidance = PerturbedAttentionGuidance(model, guide_scale=2.5, drop_layers=LAYERS)
    th.manual_seed(5)
    with th.no_grad():
        step = diffusion.p_sample if sampler == "ddpm" else diffusion.ddim_sample
        ours = step(model, x, t, model_kwargs={"y": Y}, guidance=guidance)["sample"]
        expected = literal_step(diffusion, model, x, t, guidance.perturbation, 2.5, sampler)
        # Combining the raw outputs as if they were eps (SAG's old bug) is another step.
        out1 = raw_output(model, diffusion, x, t, Y)
        with guidance.perturbation():
            out2 = raw_output(model, diffusion, x, t, Y)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=2e-5)
    if sampler == "ddim":  # combining the raw outputs as if they were eps gives another x_0
        wrong = x0_from_eps(diffusion, x, t, out2[:, :3] + 2.5 * (out1[:, :3] - out2[:, :3])).clamp(-1, 1)
        with th.no_grad():
            ours_x0 = diffusion.ddim_sample(model, x, t, model_kwargs={"y": Y}, guidance=guidance)
        assert (ours_x0["guided_pred_xstart"] - wrong).abs().max() > 1e-2


def test_sag_guides_the_eps_of_an_x0_model():
    """SAG on an x_0-predicting model: eps from the raw x_0, both for re-noising the blurred x_0
    and for the combination (the original's ``out['eps']``), then the usual step."""
    model, diffusion = tiny(timestep_respacing="10", predict_xstart=True)
    assert diffusion.model_mean_type == gd.ModelMeanType.START_X
    x, t = inputs(2)
    sag = SelfAttentionGuidance(model, guide_scale=1.8, guide_start=10, blur_sigma=3, sel_attn_depth=2,
                                keep_intermediates=True)
    th.manual_seed(5)
    with th.no_grad():
        ours = diffusion.ddim_sample(model, x, t, model_kwargs={"y": Y}, guidance=sag)
    mask = ours["sag"]["mask"]
    th.manual_seed(5)
    with th.no_grad():
        out1 = raw_output(model, diffusion, x, t, Y)
        eps1 = eps_from_x0(diffusion, x, t, out1[:, :3])
        x_bar, _ = degrade(diffusion, out1[:, :3].clamp(-1, 1), t, eps1, mask, 3.0)
        out2 = raw_output(model, diffusion, x_bar, t, Y)
    eps2 = eps_from_x0(diffusion, x_bar, t, out2[:, :3])
    x0 = x0_from_eps(diffusion, x, t, eps2 + 1.8 * (eps1 - eps2)).clamp(-1, 1)
    prev = coef(diffusion, "alphas_cumprod_prev", t)
    expected = x0 * th.sqrt(prev) + th.sqrt(1 - prev) * eps_from_x0(diffusion, x, t, x0)
    np.testing.assert_allclose(ours["guided_pred_xstart"].numpy(), x0.numpy(), atol=2e-5)
    np.testing.assert_allclose(ours["sample"].numpy(), expected.numpy(), atol=2e-5)
    assert mask.sum() > 0 and 0 < float((mask == 0).float().mean())
    sag.close()


# ---------------------------------------------------------------------------- window and passes


class CountingModel(th.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_window_is_inclusive_on_respaced_steps_and_switches_mid_trajectory():
    model, diffusion = tiny(timestep_respacing="10")
    counting = CountingModel(model)
    guidance = PerturbedAttentionGuidance(model, drop_layers=LAYERS, guidance_window=(6, 3),
                                          keep_intermediates=True)
    with th.no_grad():
        steps = list(diffusion.ddim_sample_loop_progressive(
            counting, (1, 3, 32, 32), model_kwargs={"y": Y[:1]}, guidance=guidance))
    assert ["pag" in s for s in steps] == [False] * 3 + [True] * 4 + [False] * 3  # t = 9..0
    assert counting.calls == 10 + 4


def test_step_hint_is_the_respaced_index():
    """A loop that passes raw timesteps (a multistep solver) tells the window its respaced index."""
    model, _ = tiny()
    guidance = PerturbedAttentionGuidance(model, drop_layers=LAYERS, guidance_window=(5, 5))
    raw = th.tensor([900, 900])
    guidance.step_hint = (raw, 5)
    assert guidance.is_active(raw)
    guidance.step_hint = (raw, 4)
    assert not guidance.is_active(raw)
    assert guidance.is_active(th.tensor([5, 0]))  # without a hint for this tensor: t[0]
    assert isinstance(guidance, TwoPassGuidance)


@pytest.mark.parametrize("strategy, sampler", [(PAG, "p_sample_loop"), (SEG, "ddim_sample_loop")])
def test_scale_one_is_plain_sampling_with_one_pass(strategy, sampler):
    model, diffusion = tiny(timestep_respacing="4")
    counting = CountingModel(model)
    noise = inputs(3)[0][:1]
    th.manual_seed(1)
    plain = getattr(diffusion, sampler)(counting, noise.shape, noise=noise, model_kwargs={"y": Y[:1]})
    counting.calls = 0
    th.manual_seed(1)
    guidance = PerturbedAttentionGuidance(model, guide_scale=1.0, drop_layers=LAYERS, strategy=strategy)
    same = getattr(diffusion, sampler)(counting, noise.shape, noise=noise, model_kwargs={"y": Y[:1]},
                                       guidance=guidance)
    assert counting.calls == 4 and th.equal(plain, same)


def test_ddpm_rng_draws_one_mask_per_layer_per_guided_step(monkeypatch):
    model, diffusion = tiny(timestep_respacing="4")
    shapes = []
    real_rand = th.rand
    monkeypatch.setattr(th, "rand", lambda *a, **k: shapes.append(tuple(a[0])) or real_rand(*a, **k))
    guidance = PerturbedAttentionGuidance(model, drop_layers=LAYERS, guidance_window=(2, 1))
    with th.no_grad():
        diffusion.p_sample_loop(model, (2, 3, 32, 32), model_kwargs={"y": Y}, guidance=guidance)
    assert shapes == [(8, 64, 64)] * 4  # 2 guided steps x 2 layers, (B*heads, T, T)
    shapes.clear()
    x, t = inputs()[0], th.tensor([2, 2])
    with th.no_grad():
        for settings in (dict(strategy=SEG), dict(reproduce_rng=False)):
            guidance = PerturbedAttentionGuidance(model, drop_layers=LAYERS, **settings)
            diffusion.p_sample(model, x, t, model_kwargs={"y": Y}, guidance=guidance)
    assert shapes == []


def test_drop_layer_randomly_picks_one_layer_per_guided_step_reproducibly():
    model, diffusion = tiny(timestep_respacing="5")
    choices = LAYERS + ["output_blocks.0.1"]

    def run(seed):
        guidance = PerturbedAttentionGuidance(model, drop_layers=choices, drop_layer_randomly=True)
        picked, choose = [], guidance._random_layer
        guidance._random_layer = lambda: picked.append(choose()) or picked[-1]
        th.manual_seed(seed)
        with th.no_grad():
            out = diffusion.ddim_sample_loop(model, (1, 3, 32, 32), model_kwargs={"y": Y[:1]}, guidance=guidance)
        return out, picked

    (a, picked_a), (b, picked_b) = run(3), run(3)
    assert th.equal(a, b) and picked_a == picked_b and len(picked_a) == 5
    assert set(picked_a) <= set(choices) and len(set(picked_a + run(4)[1])) > 1


# ---------------------------------------------------------------------------- the perturbation


def test_identity_perturbation_is_the_block_without_attention():
    """noise_scale 1 with the diagonal kept: the block's attention output is exactly v."""
    model, _ = tiny()
    block = attention_layers(model)["middle_block.1"][0]
    x = th.randn(2, block.channels, 8, 8)
    with th.no_grad(), perturbed_attention(model, ["middle_block.1"]):
        perturbed = block(x)
    flat = x.reshape(2, block.channels, -1)
    qkv = block.qkv(block.norm(flat))
    ch = block.channels // block.num_heads
    v = qkv.reshape(2 * block.num_heads, 3 * ch, -1)[:, 2 * ch:]
    expected = flat + block.proj_out(v.reshape(2, block.channels, -1))
    assert th.equal(perturbed, expected.reshape(x.shape))


def test_perturbation_restores_the_ops_and_their_hooks():
    model, _ = tiny()
    block = attention_layers(model)["output_blocks.0.1"][0]
    original = block.attention
    sag = SelfAttentionGuidance(model, sel_attn_block="output", sel_attn_depth=0)
    with perturbed_attention(model, ["output_blocks.0.1", "middle_block.1"], strategy=SEG):
        assert isinstance(block.attention, PerturbedAttention) and block._forward_pre_hooks
        with pytest.raises(RuntimeError, match="already perturbed"):
            with perturbed_attention(model, ["middle_block.1"]):
                pass
    assert block.attention is original and not block._forward_pre_hooks
    assert original._forward_hooks  # the SAG probe is still attached
    sag.close()
    with pytest.raises(ValueError):
        with perturbed_attention(model, ["nope"]):
            pass
    assert all(not isinstance(b.attention, PerturbedAttention) for b, _ in attention_layers(model).values())


@pytest.mark.parametrize("sigma,width,size", [(0.1, 8, 1), (0.5, 8, 3), (1.0, 8, 7), (1.2, 8, 9), (3.0, 8, 9),
                                              (9999.0, 8, 9), (2.0, 16, 13), (3.0, 16, 17), (5.0, 32, 31),
                                              (6.0, 32, 33), (2.0, 7, 7)])
def test_seg_kernel_rule_and_cap(sigma, width, size):
    assert seg_kernel_size(sigma, width) == size


def test_seg_blur_is_a_reflect_padded_gaussian_and_the_mean_beyond_9999():
    q = th.randn(3, 4, 64, generator=th.Generator().manual_seed(4), dtype=th.float64).float()
    sigma = 1.0
    taps = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(q.numpy().reshape(3, 4, 8, 8).astype(np.float64), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")
    direct = sum(taps[i] * taps[j] * padded[:, :, i:i + 8, j:j + 8] for i in range(7) for j in range(7))
    np.testing.assert_allclose(seg_blur_queries(q, (8, 8), sigma).numpy(), direct.reshape(3, 4, 64), atol=1e-6)
    mean = q.mean(dim=-1, keepdim=True).expand_as(q)
    assert th.equal(seg_blur_queries(q, (8, 8), 10000.0), mean)
    assert th.equal(seg_blur_queries(q, (8, 8), math.inf), mean)
    assert not th.allclose(seg_blur_queries(q, (8, 8), 9999.0), mean, atol=1e-3)  # strict threshold
    with pytest.raises(ValueError, match="square"):
        seg_blur_queries(q, (4, 16), 1.0)


def test_mask_without_diagonal_at_noise_scale_one_is_nan_as_the_original():
    """A raw forward reproduces it; guiding with it is refused (see test_invalid_settings)."""
    model, _ = tiny()
    x, t = inputs()
    with th.no_grad(), perturbed_attention(model, ["middle_block.1"], strategy=MASK, noise_scale=1.0):
        assert th.isnan(model(x, t, Y)).all()


def test_seg_refuses_a_non_square_grid():
    model, _ = tiny()
    with th.no_grad(), perturbed_attention(model, ["middle_block.1"], strategy=SEG):
        with pytest.raises(ValueError, match="square 2-D token grid"):
            model(th.randn(1, 3, 32, 16), th.tensor([10]), th.tensor([1]))


# ---------------------------------------------------------------------------- errors


def test_layer_errors_list_valid_names_with_grids():
    model, _ = tiny_model_and_diffusion()
    with pytest.raises(ValueError) as info:
        PerturbedAttentionGuidance(model, drop_layers=["input_blocks.14.1", "middle_block.1"])
    message = str(info.value)
    assert "input_blocks.14.1" in message and "middle_block.1 (8x8)" in message
    assert "input_blocks.1.1 (32x32)" in message and "input_blocks.4.1 (16x16)" in message
    assert "output_blocks.8.1 (32x32)" in message and "\n" not in message
    with pytest.raises(ValueError, match="not an attention block"):
        PerturbedAttentionGuidance(model, drop_layers=["middle_block.0"])  # a ResBlock


@pytest.mark.parametrize("bad, needle", [
    (dict(guide_scale=float("nan")), "finite"), (dict(guide_scale=float("inf")), "finite"),
    (dict(strategy="attention_drop"), "unknown perturbation strategy"),
    (dict(strategy=MASK), "masks every logit"), (dict(noise_scale=1.5), "in [0, 1]"),
    (dict(strategy=SEG, seg_sigma=0.0), "positive"), (dict(strategy=SEG, seg_sigma=float("nan")), "positive"),
    (dict(guidance_window=(0, 5)), "start must be >= end"), (dict(drop_layers=[]), "at least one"),
])
def test_invalid_settings(bad, needle):
    model, _ = tiny()
    settings = dict(drop_layers=LAYERS)
    settings.update(bad)
    with pytest.raises(ValueError) as info:
        PerturbedAttentionGuidance(model, **settings)
    assert needle in str(info.value)


@pytest.mark.parametrize("text, needle", [
    ('{"attention_mask_identity":[25,0]', "not valid JSON"),
    ('[25, 0]', "JSON object"),
    ('{}', "JSON object"),
    ('{"attention_mask_identity":[25,0],"seg":[25,0]}', "two strategies at once"),
    ('{"sag":[250,0],"attention_mask_identity":[25,0]}', "SAG and PAG/SEG requested in one run"),
    ('{"attention_noise":[25,0]}', "unknown strategy"),
    ('{"seg":[0,25]}', "start must be >= end"),
    ('{"seg":[25]}', "[start, end]"),
])
def test_strategy_errors(text, needle):
    with pytest.raises(ValueError) as info:
        parse_strategies(text)
    assert needle in str(info.value)


def test_guidance_kwargs_routes_and_refuses_mixing():
    model, diffusion = tiny(timestep_respacing="2")
    run = dict(model_kwargs={"y": Y[:1]}, device=th.device("cpu"))
    with pytest.raises(ValueError, match="SAG and PAG/SEG requested in one run: guide_start"):
        diffusion.ddim_sample_loop(model, (1, 3, 32, 32), guidance_kwargs={
            "guidance_strategies": {PAG: [2, 0]}, "guide_start": 250, "drop_layers": LAYERS}, **run)
    with pytest.raises(ValueError, match="guide_schedule"):
        diffusion.ddim_sample_loop(model, (1, 3, 32, 32), guidance_kwargs={
            "guidance_strategies": {PAG: [2, 0]}, "guide_schedule": "linear", "drop_layers": LAYERS}, **run)
    # The PAG code's {"sag": [start, end]} is SAG with that window (blur_sigma from the dict).
    th.manual_seed(0)
    a = diffusion.ddim_sample_loop(model, (1, 3, 32, 32), guidance_kwargs={
        "guidance_strategies": {"sag": [0, 0]}, "guide_scale": 1.5, "blur_sigma": 3}, **run)
    th.manual_seed(0)
    with SelfAttentionGuidance(model, guide_scale=1.5, guide_start=1, blur_sigma=3) as sag:
        b = diffusion.ddim_sample_loop(model, (1, 3, 32, 32), guidance=sag, **run)
    assert th.equal(a, b)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("strategy", [PAG, SEG])
def test_fp16_torso_perturbation_matches_fp32_roughly(strategy):
    """--use_fp16 models: the mask fills fp16 logits, SEG blurs fp16 queries with an fp16 kernel."""
    import copy

    model, _ = tiny()
    half = copy.deepcopy(model)
    half.convert_to_fp16()
    x, t = inputs(5)
    settings = dict(strategy=strategy, seg_sigma=2.0) if strategy == SEG else dict(strategy=strategy)
    outs = []
    for net in (model, half):
        th.manual_seed(3)
        with th.no_grad(), perturbed_attention(net, LAYERS, **settings):
            outs.append(net(x, t, Y))
    assert outs[1].dtype == th.float32 and th.isfinite(outs[1]).all()
    assert (outs[0] - outs[1]).abs().max() < 0.05 * outs[0].abs().max()
