"""The PAG / SEG command line of ``image_sample.py`` and ``classifier_sample.py``.

The PAG repository's flags keep their names and meaning (its published command lines run
unchanged), SEG gets the same shape:

    --guidance_strategies '{"attention_mask_identity": [25, 0]}'   (or "attention_mask", "seg",
                                                                     or the PAG code's "sag")
    --drop_layers input_blocks.14.1 ... --noise_scale 1.0 --drop_layer_randomly False
    --seg_layers middle_block.1 --seg_blur_sigma inf [--seg_scale 3.0]
    --gpu N | --gpu_offset K   --results_root_dir R --results_dir D   --save_png True
    --seed_everything True   --visualize True

The sampling driver calls, in this order: :func:`add_arguments` (parser), :func:`validate`
(before anything is written; ValueError = one error line), :func:`build_guidance` (None: no PAG/SEG requested, SAG as before) and, per
finished batch before its shard is written, :func:`after_batch`. :data:`HARMLESS_ARGS` are the
flags a resumed run may change. ``--gpu`` / ``--gpu_offset`` choose the device in
``dist_util.init_ranks``.
"""

import math
import os

import numpy as np

from . import pag
from .image_io import make_grid, to_uint8_nhwc, write_png

# The SAG flags and their defaults: set to anything else together with a PAG/SEG strategy, SAG
# and PAG would both be requested.
SAG_FLAG_DEFAULTS = dict(guide_start=250, sel_attn_block="output", sel_attn_depth=2, blur_sigma=9.0,
                         sag_heads="reference")
PAG_GUIDE_SCALE = 4.0  # --guide_scale when a PAG/SEG strategy is given without one
VISUALIZED_STEPS = 10  # about this many guided steps per --visualize picture

# argparse hands the default object itself to the namespace when a flag is absent, so this very
# float object (not any equal one) in args.guide_scale means "--guide_scale not given".
_GUIDE_SCALE_NOT_GIVEN = float("1.5")


def add_arguments(parser):
    """Add the PAG / SEG / PAG-runner flags (call after the SAG flags exist)."""
    from .script_util import str2bool

    if parser.get_default("guide_scale") == _GUIDE_SCALE_NOT_GIVEN:
        parser.set_defaults(guide_scale=_GUIDE_SCALE_NOT_GIVEN)
        action = parser._option_string_actions.get("--guide_scale")
        if action is not None:
            action.help = ("guidance scale: SAG's s (default 1.5), or with --guidance_strategies "
                           "PAG's / SEG's scale = 1 + the paper's (default 4.0); 1.0 = no guidance")
    group = parser.add_argument_group(
        "PAG / SEG (perturbed-attention and smoothed-energy guidance; flags of the PAG repository)")
    group.add_argument("--guidance_strategies", default=None, metavar="JSON",
                       help='one strategy and its window of respaced steps, both ends inclusive: '
                       '\'{"attention_mask_identity": [25, 0]}\' (PAG), "attention_mask" (PAG '
                       'without the diagonal), "seg" (SEG), "sag" (SAG, as in the PAG code)')
    group.add_argument("--drop_layers", nargs="+", default=None, metavar="NAME",
                       help="attention blocks to perturb (named_modules paths; default: "
                       f"{' '.join(pag.PAG_DEFAULT_LAYERS)} for PAG, as published for ImageNet 256)")
    group.add_argument("--noise_scale", type=float, default=1.0,
                       help="probability that a logit is masked (1.0: PAG's identity attention)")
    group.add_argument("--drop_layer_randomly", type=str2bool, default=False,
                       help="perturb one randomly chosen --drop_layers block per guided step")
    group.add_argument("--pag_reproduce_rng", type=str2bool, default=True,
                       help="draw the original's random masks also where they are fixed (noise_scale "
                       "1), so DDPM runs give its samples; False skips them (DDIM eta 0: no change)")
    group.add_argument("--seg_layers", nargs="+", default=None, metavar="NAME",
                       help=f"SEG's attention blocks (default {' '.join(pag.SEG_DEFAULT_LAYERS)}; "
                       "--drop_layers works too)")
    group.add_argument("--seg_blur_sigma", type=float, default=math.inf,
                       help="SEG's query blur sigma in tokens; inf or > 9999: the mean query (default; "
                       "the only sigma that means the same on every grid size)")
    group.add_argument("--seg_scale", type=float, default=None,
                       help="the official SEG code's seg_scale s, the same as --guide_scale 1+s "
                       "(paper Eq. 9's gamma is our guide_scale, the code's / Eq. 10's is guide_scale-1)")
    group.add_argument("--gpu", type=int, default=None,
                       help="CUDA device of a one-process run (every rank uses it under mpiexec)")
    group.add_argument("--gpu_offset", type=int, default=0,
                       help="under mpiexec, rank r of a node uses CUDA device gpu_offset + r")
    group.add_argument("--results_root_dir", default=None,
                       help="with --results_dir: the run directory is RESULTS_ROOT_DIR/RESULTS_DIR "
                       "(instead of --output_dir; default root RESULTS)")
    group.add_argument("--results_dir", default=None, help="see --results_root_dir (default 'default')")
    group.add_argument("--save_png", type=str2bool, default=False,
                       help="also write every sample as png/<index>_class_<label>.png beside the npz")
    group.add_argument("--seed_everything", type=str2bool, default=True,
                       help="accepted for the PAG scripts: every batch is always seeded from --seed "
                       "(rank-independent), so this changes nothing")
    group.add_argument("--visualize", type=str2bool, default=False,
                       help="PAG/SEG: per sample, visualize/<index>.png with the guided, unperturbed "
                       "and perturbed x_0 and the guidance delta at about 10 guided steps")


# ----------------------------------------------------------------------------- validation


def requested(args):
    """Whether the run uses ``--guidance_strategies`` (PAG, SEG or the PAG code's SAG)."""
    return getattr(args, "guidance_strategies", None) is not None


def validate(args):
    """Check and resolve the PAG / SEG / runner flags in place; ValueError with one line.

    Idempotent. Resolves ``--guidance_strategies`` to a dict, ``--guide_scale`` (default 4.0 for
    PAG / SEG, ``--seg_scale`` alias), ``--output_dir`` from ``--results_root_dir/--results_dir``.
    """
    _resolve_output_dir(args)
    for flag in ("gpu", "gpu_offset"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be a non-negative CUDA device index, got {getattr(args, flag)}")
    given_scale = getattr(args, "guide_scale", None) is not _GUIDE_SCALE_NOT_GIVEN
    if not requested(args):
        _refuse_pag_flags_without_strategy(args)
        args.guide_scale = float(args.guide_scale)
        return
    name, _ = pag.parse_strategies(args.guidance_strategies)
    args.guidance_strategies = {name: list(pag.parse_strategies(args.guidance_strategies)[1])}
    if name != pag.SAG_STRATEGY:
        mixed = [f"--{flag} {getattr(args, flag)}" for flag, default in SAG_FLAG_DEFAULTS.items()
                 if getattr(args, flag, default) != default]
        if mixed:
            raise ValueError(f"SAG and PAG/SEG requested in one run: {', '.join(mixed)} (SAG flags) with "
                             f"--guidance_strategies {name}; drop the SAG flags or use "
                             '\'{"sag": [start, end]}\'')
    if name != pag.SEG:
        seg_flags = _seg_flags_given(args)
        if seg_flags:
            raise ValueError(f"{', '.join(seg_flags)}: SEG flags need --guidance_strategies "
                             '\'{"seg": [start, end]}\'')
    if name == pag.SEG and args.seg_scale is not None:
        if not math.isfinite(args.seg_scale):
            raise ValueError(f"--seg_scale must be a finite number, got {args.seg_scale}")
        if given_scale and float(args.guide_scale) != 1.0 + args.seg_scale:
            raise ValueError(f"--guide_scale {args.guide_scale} and --seg_scale {args.seg_scale} disagree "
                             "(guide_scale = 1 + seg_scale); give one of them")
        args.guide_scale = 1.0 + args.seg_scale
    elif not given_scale and name != pag.SAG_STRATEGY:
        args.guide_scale = PAG_GUIDE_SCALE
    args.guide_scale = float(args.guide_scale)
    if not math.isfinite(args.guide_scale):
        raise ValueError(f"--guide_scale must be a finite number, got {args.guide_scale}")
    if name != pag.SAG_STRATEGY:
        pag.check_perturbation(name, args.noise_scale, args.seg_blur_sigma)
        layers(args)
    if args.visualize and name == pag.SAG_STRATEGY:
        raise ValueError("--visualize shows PAG/SEG steps; for SAG use scripts/visualize_sag.py")


def _resolve_output_dir(args):
    if getattr(args, "results_root_dir", None) is None and getattr(args, "results_dir", None) is None:
        return
    chosen = os.path.join(args.results_root_dir or "RESULTS", args.results_dir or "default")
    if args.output_dir and os.path.normpath(args.output_dir) != os.path.normpath(chosen):
        raise ValueError(f"--output_dir {args.output_dir} and --results_root_dir/--results_dir ({chosen}) "
                         "both choose the run directory; give one of them")
    args.output_dir = chosen


def _seg_flags_given(args):
    given = []
    if args.seg_layers is not None:
        given.append("--seg_layers")
    if args.seg_blur_sigma != math.inf:
        given.append("--seg_blur_sigma")
    if args.seg_scale is not None:
        given.append("--seg_scale")
    return given


def _refuse_pag_flags_without_strategy(args):
    given = _seg_flags_given(args)
    if args.drop_layers is not None:
        given.append("--drop_layers")
    if args.noise_scale != 1.0:
        given.append("--noise_scale")
    if args.drop_layer_randomly:
        given.append("--drop_layer_randomly")
    if args.visualize:
        given.append("--visualize")
    if given:
        raise ValueError(f"{', '.join(given)} need --guidance_strategies, e.g. "
                         '\'{"attention_mask_identity": [25, 0]}\' (PAG) or \'{"seg": [25, 0]}\' (SEG)')


def layers(args):
    """The attention blocks to perturb, from ``--seg_layers`` / ``--drop_layers`` or the default."""
    return _layers_and_flag(args)[0]


def _layers_and_flag(args):
    name = next(iter(args.guidance_strategies))
    if name == pag.SEG and args.seg_layers is not None:
        if args.drop_layers is not None and args.drop_layers != args.seg_layers:
            raise ValueError(f"--seg_layers {' '.join(args.seg_layers)} and --drop_layers "
                             f"{' '.join(args.drop_layers)} disagree; give one of them")
        return list(args.seg_layers), "--seg_layers"
    if args.drop_layers is not None:
        return list(args.drop_layers), "--drop_layers"
    default = pag.SEG_DEFAULT_LAYERS if name == pag.SEG else pag.PAG_DEFAULT_LAYERS
    return list(default), "the default layers"


# ----------------------------------------------------------------------------- building


def build_guidance(args, model, fast=None):
    """The guidance object for ``--guidance_strategies`` (None when it is not given).

    :param model: the UNet (after ``prepare_model``). :param fast: the fast-path flags dict.
    """
    if not requested(args):
        return None
    validate(args)
    name, window = pag.parse_strategies(args.guidance_strategies)
    from .fast_path import pag_class, sag_class

    if name == pag.SAG_STRATEGY:
        return sag_class(**(fast or {}))(model, guide_scale=args.guide_scale, blur_sigma=args.blur_sigma,
                        sel_attn_block=args.sel_attn_block, sel_attn_depth=args.sel_attn_depth,
                        sag_heads=args.sag_heads, guidance_window=window)
    names, flag = _layers_and_flag(args)
    pag.resolve_layers(model, names, flag)  # the error names the flag the user gave
    guidance = pag_class(**(fast or {}))(  # the fast path's class with --fast_attention True
        model, guide_scale=args.guide_scale, drop_layers=names, guidance_window=window,
        strategy=name, noise_scale=args.noise_scale, seg_sigma=args.seg_blur_sigma,
        drop_layer_randomly=args.drop_layer_randomly, reproduce_rng=args.pag_reproduce_rng)
    if args.visualize:
        record_guided_steps(guidance)
    return guidance


# ----------------------------------------------------------------------------- per batch


def after_batch(args, batch, images, labels, guidance):
    """Write what ``--save_png`` / ``--visualize`` ask for one finished global batch (called
    before its shard, which marks the batch as done, so a crash never leaves it half-written)."""
    first = batch * args.batch_size
    count = max(0, min(len(images), args.num_samples - first))
    if getattr(args, "save_png", False):
        os.makedirs(os.path.join(args.output_dir, "png"), exist_ok=True)
        for i in range(count):
            name = f"{first + i:06d}" + ("" if labels is None else f"_class_{int(labels[i])}")
            write_png(os.path.join(args.output_dir, "png", f"{name}.png"), images[i])
    records = getattr(guidance, "recorded_steps", None)
    if getattr(args, "visualize", False) and records is not None:
        os.makedirs(os.path.join(args.output_dir, "visualize"), exist_ok=True)
        for i in range(count):
            if records:
                path = os.path.join(args.output_dir, "visualize", f"{first + i:06d}.png")
                write_png(path, visualization(records, i))
        records.clear()


def record_guided_steps(guidance):
    """Make ``guidance`` keep, for about :data:`VISUALIZED_STEPS` guided steps, uint8 images of the
    guided, unperturbed and perturbed x_0 and of the guidance delta in ``recorded_steps``."""
    guidance.keep_intermediates = True
    guidance.recorded_steps = []
    guide = guidance.guide

    def recording_guide(diffusion, model, x, t, *rest):
        out = guide(diffusion, model, x, t, *rest)
        step = guidance.current_step(t)
        if step % max(1, math.ceil(diffusion.num_timesteps / VISUALIZED_STEPS)) == 0:
            parts = out["pag"]
            guidance.recorded_steps.append(tuple(to_uint8_nhwc(image) for image in (
                out["pred_xstart"], out["unguided_pred_xstart"], parts["perturbed_pred_xstart"],
                parts["delta"])))
        return out

    guidance.guide = recording_guide


def visualization(records, index):
    """One picture: a column per recorded step, rows guided x_0 / unperturbed x_0 / perturbed
    x_0 / delta (as an image, mid-grey = 0)."""
    tiles = [step[row][index] for row in range(4) for step in records]
    return make_grid(np.stack(tiles), ncols=len(records))
