"""Respacing, schedules, flags, the classifier encoder and the training losses."""

import argparse

import numpy as np
import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    create_classifier,
    create_gaussian_diffusion,
    model_and_diffusion_defaults,
    sag_defaults,
    str2bool,
)
from tiny_models import tiny_model_and_diffusion


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    with pytest.raises(ValueError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")


def test_space_timesteps_sections():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999
    assert space_timesteps(300, "10,15,20") == space_timesteps(300, [10, 15, 20])
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 15
    assert steps[:3] == [0, 11, 22]
    assert space_timesteps(1000, [1000]) == set(range(1000))
    with pytest.raises(ValueError, match="cannot divide section of 10 steps into 11"):
        space_timesteps(10, "11")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_spaced_diffusion_keeps_alphas_cumprod(schedule):
    base = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
    spaced = create_gaussian_diffusion(steps=1000, noise_schedule=schedule, timestep_respacing="ddim25")
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 25
    assert spaced.timestep_map == list(range(0, 1000, 40))
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_beta_schedules():
    linear = gd.get_named_beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    cosine = gd.get_named_beta_schedule("cosine", 1000)
    assert cosine.max() <= 0.999 and cosine[0] < 1e-4
    with pytest.raises(NotImplementedError):
        gd.get_named_beta_schedule("quadratic", 10)


def test_spaced_model_sees_original_timesteps():
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.tolist())
        return th.zeros_like(x)

    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim4")
    diffusion.ddim_sample_loop(model, (1, 3, 4, 4), device=th.device("cpu"))
    assert seen == [[750], [500], [250], [0]]


def test_flags_types_and_defaults():
    parser = argparse.ArgumentParser()
    defaults = model_and_diffusion_defaults()
    defaults.update(sag_defaults())
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--blur_sigma", "3", "--use_fp16", "True", "--guide_start", "25"])
    assert args.blur_sigma == 3.0 and args.use_fp16 is True and args.guide_start == 25
    assert parser.parse_args(["--blur_sigma", "1.5"]).blur_sigma == 1.5
    assert args.guide_scale == 1.5 and args.sel_attn_block == "output" and args.sel_attn_depth == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--guide_start", "2.5"])
    assert str2bool("YES") and not str2bool("f")
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_classifier_pools(pool):
    th.manual_seed(0)
    clf = create_classifier(image_size=32, classifier_use_fp16=False, classifier_width=32,
                            classifier_depth=1, classifier_attention_resolutions="16,8",
                            classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                            classifier_pool=pool, num_classes=10)
    logits = clf(th.randn(2, 3, 32, 32), th.tensor([0, 500]))
    assert logits.shape == (2, 10)


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported image size: 48"):
        create_classifier(48, False, 32, 1, "8", True, True, "attention")


@pytest.mark.parametrize("overrides", [dict(), dict(learn_sigma=False), dict(use_kl=True),
                                       dict(rescale_learned_sigmas=True), dict(predict_xstart=True)])
def test_training_losses(overrides):
    model, diffusion = tiny_model_and_diffusion(attention_resolutions="8", **overrides)
    model.train()
    x = th.rand(2, 3, 32, 32) * 2 - 1
    terms = diffusion.training_losses(model, x, th.tensor([0, 600]), model_kwargs={"y": th.tensor([1, 2])})
    assert terms["loss"].shape == (2,) and th.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert model.input_blocks[0][0].weight.grad is not None


def test_calc_bpd_loop_and_reverse_ddim():
    model, diffusion = tiny_model_and_diffusion(attention_resolutions="8", timestep_respacing="4")
    x = th.rand(1, 3, 32, 32) * 2 - 1
    out = diffusion.calc_bpd_loop(model, x, model_kwargs={"y": th.tensor([1])})
    assert out["vb"].shape == (1, 4) and th.isfinite(out["total_bpd"]).all()
    rev = diffusion.ddim_reverse_sample(model, x, th.tensor([1]), model_kwargs={"y": th.tensor([1])})
    assert rev["sample"].shape == x.shape


def test_fp16_torso_runs_and_matches_fp32_roughly():
    model, diffusion = tiny_model_and_diffusion(attention_resolutions="8", use_fp16=True)
    x, t, y = th.randn(1, 3, 32, 32), th.tensor([10]), th.tensor([3])
    model.convert_to_fp32()
    with th.no_grad():
        ref = model(x, t, y)
    model.convert_to_fp16()
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == th.float16
    assert model.input_blocks[1][0].emb_layers[1].weight.dtype == th.float32
    assert model.out[2].weight.dtype == th.float32 and model.time_embed[0].weight.dtype == th.float32
    try:
        with th.no_grad():
            half = model(x, t, y)
    except RuntimeError as err:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 on this CPU: {err}")
    assert half.dtype == th.float32
    assert (half - ref).abs().max() < 0.05 * ref.abs().max()


def test_export_checkpoint_keeps_the_first_classes(tmp_path):
    import importlib.util

    from sampling_helpers import REPO

    spec = importlib.util.spec_from_file_location("export_checkpoint", REPO / "scripts" / "export_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, _ = tiny_model_and_diffusion(attention_resolutions="8")
    small = module.export(model.state_dict(), keep_classes=10)
    assert small["label_emb.weight"].shape == (10, 128)
    assert th.equal(small["label_emb.weight"], model.label_emb.weight[:10])
    clf = create_classifier(32, False, 32, 1, "16,8", True, True, "attention")
    small = module.export(clf.state_dict(), keep_classes=10)
    assert small["out.2.c_proj.weight"].shape[0] == 10 and small["out.2.c_proj.bias"].shape == (10,)
    ten = create_classifier(32, False, 32, 1, "16,8", True, True, "attention", num_classes=10)
    ten.load_state_dict(small)
    x, t = th.randn(2, 3, 32, 32), th.tensor([0, 0])
    with th.no_grad():
        assert th.allclose(ten(x, t), clf(x, t)[:, :10], atol=1e-6)
