"""Flags of scripts/image_sample.py and scripts/classifier_sample.py: the original scripts' flags
(OpenAI names and defaults), SAG's, the fast path's and ours, and their validation."""

import argparse
import math

from . import pag_flags


class UsageError(Exception):
    """A user-facing problem reported as one line on stderr (no traceback)."""


def sample_defaults():
    """The original scripts' own flags (OpenAI names and defaults)."""
    return dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")


def _grid_count(value):
    """``--save_grid``: True/yes = 64 images, False/no = off, or a number of images."""
    low = str(value).lower()
    if low in ("yes", "true", "t", "y"):
        return 64
    if low in ("no", "false", "f", "n"):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        raise argparse.ArgumentTypeError("expected True/False or a number of images")


def create_argparser(kind):
    """Flags of the original ``{kind}_sample.py`` (kind: 'image' or 'classifier') plus ours."""
    from . import script_util as su
    from .fast_path import fast_path_defaults
    from .sampler_choice import add_solver_arguments

    defaults = sample_defaults()
    if kind == "classifier":
        defaults.update(classifier_path="", classifier_scale=1.0)
    defaults.update(su.model_and_diffusion_defaults())
    defaults.update(su.sag_defaults())
    if kind == "classifier":
        defaults.update(su.classifier_defaults())
    script = f"{kind}_sample.py"
    parser = argparse.ArgumentParser(
        prog=script,
        description="Sample from an ADM/IDDPM model with Self-Attention Guidance. Flags are those "
        f"of the original {script}; the output is a resumable run directory, sharded over the "
        "ranks of mpiexec, srun or torchrun.",
    )
    su.add_dict_to_argparser(parser, defaults)
    speed = parser.add_argument_group(
        "speed (GPU fast path; defaults keep the exact float32 path, see docs/benchmarks.md)")
    su.add_dict_to_argparser(speed, fast_path_defaults())
    add_solver_arguments(parser)  # --sampler, --sampler_steps, --solver_* (sampler_choice.py)
    pag_flags.add_arguments(parser)  # PAG / SEG flags (pag_flags.py), after the SAG flags
    _set_help(parser, "--classifier_guidance",
              "ignored by image_sample.py (accepted for compatibility with the original)"
              if kind == "image" else "apply classifier guidance with --classifier_scale")
    _set_help(parser, "--guide_scale", "SAG scale s (1.0 = no SAG)")
    _set_help(parser, "--guide_start", "apply SAG at respaced steps t < guide_start")
    _set_help(parser, "--sag_heads", "'reference' (num_heads flag, legacy split) or 'model'")
    _set_help(parser, "--batch_size", "images per global batch (one batch per rank at a time)")
    parser.add_argument("--output_dir", default="",
                        help="run directory (default: RESULTS/<UTC time>); re-running with the "
                        "same arguments and directory resumes the run")
    parser.add_argument("--seed", type=int, default=None,
                        help="base seed; batch b uses a seed derived from (seed, b), so the "
                        "samples do not depend on the number of ranks (default: random, logged)")
    parser.add_argument("--save_grid", type=_grid_count, default=0, metavar="N|True",
                        help="also write samples_grid.png with the first N samples (True = 64)")
    parser.add_argument("--progress", type=su.str2bool, default=True,
                        help="show a progress bar over all images on rank 0")
    parser.add_argument("--step_progress", type=su.str2bool, default=False,
                        help="show a progress bar over the denoising steps of each batch")
    parser.add_argument("--force_unlock", type=su.str2bool, default=False, nargs="?", const=True,
                        help="take over --output_dir from a run on another host that left its "
                        "lock behind (check that it no longer runs); locks of dead runs on this "
                        "host are taken over without it")
    return parser


def _set_help(parser, flag, text):
    action = parser._option_string_actions.get(flag)
    if action is not None:
        action.help = text


def validate_args(args):
    """Reject values the samplers cannot use, before anything is built or written."""
    try:
        pag_flags.validate(args)  # PAG / SEG flags; resolves --guide_scale and --results_dir
    except ValueError as exc:
        raise UsageError(str(exc))
    for name in ("guide_scale", "blur_sigma", "classifier_scale"):
        value = getattr(args, name, 0.0)
        if not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number, got {value}")
    if args.blur_sigma <= 0:
        raise UsageError(f"--blur_sigma must be positive, got {args.blur_sigma}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError("--num_samples and --batch_size must be at least 1")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {args.seed}")
    from .sampler_choice import validate_solver_args

    try:
        validate_solver_args(args)
    except ValueError as exc:
        raise UsageError(str(exc))
