"""Flags and factories: OpenAI guided-diffusion's names, defaults and behaviour, plus SAG's flags."""

import argparse

import torch as th

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .sag import remember_sag_model
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# Default channel multipliers per image size when --channel_mult is empty (32 is our addition,
# used by the bundled digits model; the others are OpenAI's).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def diffusion_defaults():
    """Defaults for image and classifier training."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """Defaults for classifier models."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults():
    """Defaults for image training."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        num_classes=NUM_CLASSES,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def sag_defaults():
    """The SAG flags of the original CLI (same names and defaults) plus ``sag_heads``.

    ``blur_sigma`` is a float here (the original parsed it as int; integers behave the same).
    """
    return dict(
        guide_scale=1.5,
        guide_start=250,
        sel_attn_block="output",
        sel_attn_depth=2,
        blur_sigma=9.0,
        classifier_guidance=False,
        sag_heads="reference",
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    sel_attn_block=None,
    sel_attn_depth=None,
):
    """Build the UNet and its (respaced) diffusion.

    ``num_classes`` (our addition; OpenAI's models use 1000) sizes the label embedding of
    class-conditional models and the range labels are drawn from when sampling.
    ``sel_attn_block`` / ``sel_attn_depth`` (the original SAG fork's extra keywords) choose the
    block that ``guidance_kwargs`` calls probe; they do not change the model.
    """
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
    )
    diffusion = _diffusion_from_flags(
        diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
    )
    remember_sag_model(diffusion, model, sel_attn_block, sel_attn_depth)
    return model, diffusion


def _channel_mult(channel_mult, image_size):
    if channel_mult:
        return tuple(int(m) for m in str(channel_mult).split(","))
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"unsupported image size: {image_size} (give --channel_mult, or use one of "
            f"{', '.join(str(s) for s in sorted(DEFAULT_CHANNEL_MULT))})"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


def _attention_ds(image_size, attention_resolutions):
    return tuple(image_size // int(res) for res in str(attention_resolutions).split(",") if res)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
):
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(image_size, attention_resolutions),
        dropout=dropout,
        channel_mult=_channel_mult(channel_mult, image_size),
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
):
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        num_classes=num_classes,
    )
    diffusion = _diffusion_from_flags(
        diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
    )
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
):
    """OpenAI's noisy classifier (``num_classes`` is our addition, default 1000)."""
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(image_size, classifier_attention_resolutions),
        channel_mult=_channel_mult("", image_size),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def randomize_weights_(module, std=0.02, seed=None):
    """Overwrite every parameter with N(0, std^2) draws, in place; returns ``module``.

    For benchmarks and agreement checks that run without trained weights: ADM zero-initialises
    its output convolutions, so a freshly built network would predict eps = 0 and exercise
    nothing. ``seed`` reseeds torch's global generator first; without it the draws continue the
    current stream.
    """
    if seed is not None:
        th.manual_seed(seed)
    with th.no_grad():
        for param in module.parameters():
            param.normal_(0, std)
    return module


def sr_model_and_diffusion_defaults():
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    for k in list(res):
        if k not in _sr_create_args():
            del res[k]
    return res


def _sr_create_args():
    return {
        "large_size", "small_size", "class_cond", "learn_sigma", "num_channels", "num_res_blocks",
        "num_heads", "num_head_channels", "num_heads_upsample", "attention_resolutions", "dropout",
        "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
        "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm",
        "resblock_updown", "use_fp16",
    }


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
):
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )
    diffusion = _diffusion_from_flags(
        diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
):
    del small_size  # the low-resolution input is upsampled inside the model
    if large_size == 512:
        channel_mult = (1, 1, 2, 2, 4, 4)
    elif large_size == 256:
        channel_mult = (1, 1, 2, 2, 4, 4)
    elif large_size == 64:
        channel_mult = (1, 2, 3, 4)
    else:
        raise ValueError(f"unsupported large size: {large_size}")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(large_size, attention_resolutions),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def _diffusion_from_flags(diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
                          rescale_timesteps, rescale_learned_sigmas, timestep_respacing):
    return create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser, default_dict):
    """One ``--key`` flag per entry; the type is the default's (bools parse with str2bool)."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse yes/true/t/y/1 and no/false/f/n/0 (any case) as booleans."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected")
