"""The PAG and SEG golden vectors (tests/reference/golden/pag, .../seg), reproduced through the
public API: raw forwards under ``perturbed_attention`` (atol 1e-5), a seeded DDPM step (1e-4),
DDIM loops step by step (1e-3; SEG's eps outputs 5e-5), with the guidance object and with the
samplers' ``guidance_kwargs``. Also: the new qkv order gives the same perturbation as the
legacy one on equivalent weights (the original PAG code would have changed the model)."""

import math

import numpy as np
import pytest
import torch as th

from golden_sag import GoldenCase
from guided_diffusion.pag import (
    MASK,
    PAG,
    SEG,
    PerturbedAttentionGuidance,
    attention_layers,
    perturbed_attention,
)

FORWARD_ATOL, STEP_ATOL, LOOP_ATOL, EPS_ATOL = 1e-5, 1e-4, 1e-3, 5e-5
LAYERS = ["input_blocks.7.1", "input_blocks.8.1", "middle_block.1"]  # the three 8x8 blocks


def close(actual, expected, atol):
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=0, atol=atol)


def pag_case(golden_dir, name, family="pag"):
    case = GoldenCase(golden_dir, name, family)
    return (case, *case.build())


def forward(model, case):
    with th.no_grad():
        return model(case.input("x"), case.input("t"), case.input("y"))


def test_unet_forward_pag(golden_dir):
    case, model, _ = pag_case(golden_dir, "unet_forward")
    assert case.meta["drop_layers"] == LAYERS
    close(forward(model, case), case.expected("output_unperturbed"), FORWARD_ATOL)
    with perturbed_attention(model, LAYERS):
        close(forward(model, case), case.expected("output_perturbed_identity"), FORWARD_ATOL)
    for strategy, key in [(PAG, "output_perturbed_mask_p05_seed7"),
                          (MASK, "output_perturbed_mask_nodiag_p05_seed7")]:
        th.manual_seed(7)
        with perturbed_attention(model, LAYERS, strategy=strategy, noise_scale=0.5):
            close(forward(model, case), case.expected(key), FORWARD_ATOL)
    close(forward(model, case), case.expected("output_unperturbed_again"), FORWARD_ATOL)
    assert all(type(block.attention).__name__ == "QKVAttentionLegacy"
               for block, _ in attention_layers(model).values())


def test_unet_forward_seg(golden_dir):
    case, model, _ = pag_case(golden_dir, "unet_forward_seg", "seg")
    close(forward(model, case), case.expected("output_plain"), FORWARD_ATOL)
    for key, sigma in case.meta["sigmas"].items():
        with perturbed_attention(model, LAYERS, strategy=SEG, seg_sigma=float(sigma)):
            close(forward(model, case), case.expected(f"output_seg_{key}"), FORWARD_ATOL)
    close(forward(model, case), case.expected("output_plain_again"), FORWARD_ATOL)


def test_ddpm_step_pag(golden_dir):
    """One seeded p_sample: the three rand masks are drawn before the step noise, as the original."""
    case, model, diffusion = pag_case(golden_dir, "ddpm_step_pag")
    cli = case.meta["cli"]
    window = cli["guidance_strategies"]["attention_mask_identity"]
    x, t = case.input("x"), case.input("t")
    guidance = PerturbedAttentionGuidance(model, guide_scale=cli["guide_scale"], drop_layers=cli["drop_layers"],
                                          guidance_window=window, keep_intermediates=True)
    th.manual_seed(case.meta["seed"])
    with th.no_grad():
        out = diffusion.p_sample(model, x, t, clip_denoised=True, model_kwargs={"y": case.input("y")},
                                 guidance=guidance)
    close(out["sample"], case.expected("sample"), STEP_ATOL)
    close(out["guided_pred_xstart"], case.expected("pred_xstart_final"), STEP_ATOL)
    close(out["pred_xstart"], case.expected("pred_xstart"), STEP_ATOL)
    close(out["pag"]["perturbed_pred_xstart"], case.expected("pred_xstart_perturbed"), STEP_ATOL)
    close(out["pag"]["delta"], case.expected("delta"), STEP_ATOL)
    # The step noise came after the masks: sample - mean is exactly sigma * replayed noise.
    th.manual_seed(case.meta["seed"])
    for _ in LAYERS:
        th.rand(8, 64, 64)
    assert th.equal(th.randn(2, 3, 32, 32), th.from_numpy(case.expected("aux_noise_replayed")))

    # The same step through the original's guidance_kwargs (plus our drop_layers) and a wrapper
    # function, as classifier_sample.py calls it.
    def model_fn(x, t, y=None):
        return model(x, t, y)

    kwargs = {"guide_scale": 4.0, "guide_schedule": None, "blur_sigma": 9,
              "guidance_strategies": cli["guidance_strategies"], "drop_layers": cli["drop_layers"]}
    th.manual_seed(case.meta["seed"])
    with th.no_grad():
        again = diffusion.p_sample(model_fn, x, t, model_kwargs={"y": case.input("y")}, guidance_kwargs=kwargs)
    close(again["sample"], case.expected("sample"), STEP_ATOL)

    # Without the draws the guided x_0 is the same, but the DDPM noise (hence the sample) is not.
    skipping = PerturbedAttentionGuidance(model, drop_layers=LAYERS, reproduce_rng=False)
    th.manual_seed(case.meta["seed"])
    with th.no_grad():
        skipped = diffusion.p_sample(model, x, t, model_kwargs={"y": case.input("y")}, guidance=skipping)
    close(skipped["guided_pred_xstart"], case.expected("pred_xstart_final"), STEP_ATOL)
    assert not np.allclose(skipped["sample"].numpy(), case.expected("sample"), atol=1e-2)


def test_ddim10_pag_trajectory(golden_dir):
    case, model, diffusion = pag_case(golden_dir, "ddim10_pag")
    cli = case.meta["cli"]
    kwargs = {"guide_scale": 4.0, "guide_schedule": None, "blur_sigma": 9,
              "guidance_strategies": cli["guidance_strategies"], "drop_layers": cli["drop_layers"]}
    with th.no_grad():
        steps = list(diffusion.ddim_sample_loop_progressive(
            model, (2, 3, 32, 32), noise=case.input("noise"), clip_denoised=True,
            model_kwargs={"y": case.input("y")}, device=th.device("cpu"), eta=0.0, guidance_kwargs=kwargs))
    assert len(steps) == 10
    for k, out in enumerate(steps):
        close(out["sample"], case.expected("samples_per_step")[k], LOOP_ATOL)
    close(steps[-1]["sample"], case.expected("sample_final"), LOOP_ATOL)


@pytest.mark.parametrize("via", ["object", "guidance_kwargs"])
def test_ddim10_seg_trajectory(golden_dir, via):
    case, model, diffusion = pag_case(golden_dir, "ddim10_seg_s10_gs4", "seg")
    settings = dict(guide_scale=case.meta["guide_scale"], drop_layers=case.meta["layers"],
                    seg_sigma=case.meta["sigma"])
    if via == "object":
        guidance = PerturbedAttentionGuidance(model, strategy=SEG, keep_intermediates=True, **settings)
        call = dict(guidance=guidance)
    else:
        call = dict(guidance_kwargs=dict(settings, guidance_strategies={"seg": [9, 0]}, keep_intermediates=True))
    with th.no_grad():
        steps = list(diffusion.ddim_sample_loop_progressive(
            model, (2, 3, 32, 32), noise=case.input("noise"), clip_denoised=True,
            model_kwargs={"y": case.input("y")}, device=th.device("cpu"), eta=0.0, **call))
    assert all("pag" in out for out in steps)
    close(steps[0]["pag"]["eps"], case.expected("eps_first_seg_step"), EPS_ATOL)
    close(steps[0]["pag"]["perturbed_eps"], case.expected("eps_seg_first_seg_step"), EPS_ATOL)
    for k, out in enumerate(steps):
        close(out["sample"], case.expected("samples_per_step")[k], LOOP_ATOL)
        close(out["guided_pred_xstart"], case.expected("pred_xstart_per_step")[k], LOOP_ATOL)


# ---------------------------------------------------------------------------- the new qkv order


def new_order_twin(case):
    """The golden model rebuilt with ``use_new_attention_order``, its qkv rows permuted so that it
    computes the same function: legacy row ``3Ch + jC + c`` (head h, part j of q/k/v) becomes new
    row ``jHC + hC + c``."""
    legacy, _ = case.build()
    twin, _ = case.build(use_new_attention_order=True)
    state = legacy.state_dict()
    for name, (block, _) in attention_layers(legacy).items():
        heads, width = block.num_heads, block.channels
        ch = width // heads
        order = [3 * ch * h + ch * j + c for j in range(3) for h in range(heads) for c in range(ch)]
        for key in ("weight", "bias"):
            state[f"{name}.qkv.{key}"] = state[f"{name}.qkv.{key}"][order].clone()
    twin.load_state_dict(state, strict=True)
    assert all(type(b.attention).__name__ == "QKVAttention" for b, _ in attention_layers(twin.eval()).values())
    return twin


def test_new_qkv_order_is_perturbed_per_head_like_the_legacy_order(golden_dir):
    """SEG blurs the queries and PAG masks the logits of each block in its own qkv order: a
    new-order model with permuted weights gives the legacy goldens; blurring the first C qkv rows
    (legacy reading of a new-order block) would be another perturbation."""
    pag_golden = GoldenCase(golden_dir, "unet_forward", "pag")
    seg_golden = GoldenCase(golden_dir, "unet_forward_seg", "seg")
    twin = new_order_twin(seg_golden)
    close(forward(twin, seg_golden), seg_golden.expected("output_plain"), FORWARD_ATOL)
    for key in ("sigma3", "sigmainf"):
        sigma = float(seg_golden.meta["sigmas"][key])
        with perturbed_attention(twin, LAYERS, strategy=SEG, seg_sigma=sigma):
            close(forward(twin, seg_golden), seg_golden.expected(f"output_seg_{key}"), FORWARD_ATOL)
    with perturbed_attention(twin, LAYERS):
        close(forward(twin, pag_golden), pag_golden.expected("output_perturbed_identity"), FORWARD_ATOL)
    th.manual_seed(7)
    with perturbed_attention(twin, LAYERS, noise_scale=0.5):
        close(forward(twin, pag_golden), pag_golden.expected("output_perturbed_mask_p05_seed7"), FORWARD_ATOL)

    # The pitfall of the spec: the legacy reading of a new-order block's rows is not SEG.
    from guided_diffusion import pag as pag_module

    real = pag_module.qkv_heads
    try:
        pag_module.qkv_heads = lambda qkv, n_heads, new_order: real(qkv, n_heads, False)
        with perturbed_attention(twin, LAYERS, strategy=SEG, seg_sigma=math.inf):
            wrong = forward(twin, seg_golden)
    finally:
        pag_module.qkv_heads = real
    assert np.abs(wrong.numpy() - seg_golden.expected("output_seg_sigmainf")).max() > 1e-2
