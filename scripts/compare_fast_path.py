"""Check a faster sampling path against the exact float32 path, step by step, on one model.

Every DDIM step starts both paths from the same x_t (the exact path's trajectory) with the
guidance on (SAG, or PAG / SEG with ``--guidance_strategies``), and compares: the SAG mask
(share of equal positions; PAG / SEG have none), the first pass's eps (norm-relative and
max-relative error), the second pass's eps and the guided eps. Takes the sampling scripts' model
and guidance flags, so any checkpoint can be checked before a long run; ``--model_path random``
uses random weights in the given layout (no checkpoint needed). Prints a table last; ``--check
True`` exits with status 1 when a path misses its tolerance (first-pass eps within 16 unit
roundoffs of its format, norm-relative; SAG: mask agreement over the trajectory >= 99%; PAG /
SEG: the second pass's eps within the same tolerance).
PAG / SEG guide every compared step whatever the flags' window.

    source configs/digits.sh   # the bundled default (trained weights)
    python scripts/compare_fast_path.py $SAG_FLAGS $MODEL_FLAGS --model_path $MODEL_PATH
    python scripts/compare_fast_path.py $MODEL_FLAGS --model_path $MODEL_PATH \
        --guidance_strategies '{"attention_mask_identity": [49, 0]}' --drop_layers middle_block.1
    python scripts/compare_fast_path.py --image_size 256 --num_channels 256 --num_res_blocks 2 \\
        --attention_resolutions 32,16,8 --num_head_channels 64 --resblock_updown True \\
        --use_scale_shift_norm True --learn_sigma True --model_path random --batch_size 4

Paths (``--paths``, comma list): ``orig_fp16`` (OpenAI's ``--use_fp16`` torso, einsum attention),
or a fast path written as ``+``-joined parts: a precision ``fp32|bf16|fp16`` (autocast; fp32 =
SDPA attention alone) and any of ``tf32``, ``nhwc``, ``compile``, ``cudagraphs``.
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch as th  # noqa: E402

from guided_diffusion.bench_report import append_markdown, describe_machine  # noqa: E402
from guided_diffusion.checkpoint_util import CheckpointError, load_checkpoint  # noqa: E402
from guided_diffusion.fast_path import (  # noqa: E402
    DTYPES,
    pag_class,
    prepare_model,
    sag_class,
    set_tf32,
    tf32_mode,
)
from guided_diffusion.path_agreement import compare_guided_steps, summarize  # noqa: E402
from guided_diffusion import pag, pag_flags, script_util as su  # noqa: E402

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
ROUNDOFFS_ALLOWED = 16  # first-pass eps error allowed, in unit roundoffs of the path's format
MIN_MASK_AGREEMENT = 0.99
FP32_FLOOR = 1e-5  # fp32 paths still reorder sums: allow this much relative error
PARTS = ("tf32", "nhwc", "compile", "cudagraphs")
DEFAULT_PATHS = {
    "cuda": "orig_fp16,fp32,fp16,bf16,bf16+tf32+nhwc,bf16+tf32+nhwc+compile,bf16+tf32+nhwc+cudagraphs",
    "cpu": "fp32,bf16",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = su.model_and_diffusion_defaults()
    defaults.update(su.sag_defaults())
    defaults.update(timestep_respacing="ddim25", model_path="", batch_size=8)
    su.add_dict_to_argparser(p, defaults)
    pag_flags.add_arguments(p)  # --guidance_strategies, --drop_layers, --seg_blur_sigma, ...
    p.add_argument("--paths", default="", help="comma list (see above); default: "
                   + "; ".join(f"{dev}: {paths}" for dev, paths in DEFAULT_PATHS.items()))
    p.add_argument("--steps", type=int, default=0, help="compared steps from the top (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--check", type=su.str2bool, default=False,
                   help="exit with status 1 if a path misses its tolerance")
    p.add_argument("--per_step", type=su.str2bool, default=False, help="also print every step")
    p.add_argument("--out", default="", help="append the table (markdown) to this file")
    args = p.parse_args(argv)
    if not args.model_path:
        p.error("--model_path is required: a checkpoint, or 'random' for random weights "
                "(e.g. source configs/digits.sh and pass --model_path $MODEL_PATH)")
    if args.model_path != "random" and not os.path.isfile(args.model_path):
        p.error(f"--model_path {args.model_path}: no such file")
    try:
        pag_flags.validate(args)  # resolves --guide_scale (PAG / SEG default 4.0)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    return args


def strategy(args):
    """``sag``, or the PAG / SEG strategy of ``--guidance_strategies``."""
    return next(iter(args.guidance_strategies)) if pag_flags.requested(args) else pag.SAG_STRATEGY


def parse_path(spec):
    """``orig_fp16`` or ``precision[+part...]`` -> (format for the tolerance, prepare kwargs)."""
    if spec == "orig_fp16":
        return "fp16", None
    precision, *parts = spec.split("+")
    unknown = [part for part in parts if part not in PARTS]
    if precision not in DTYPES or unknown or len(set(parts)) != len(parts):
        raise ValueError(f"--paths: cannot read {spec!r}; use orig_fp16 or fp32|bf16|fp16 "
                         f"followed by +parts from {', '.join(PARTS)} (e.g. bf16+tf32+nhwc+compile)")
    kwargs = dict(fast_attention=True, dtype=precision, allow_tf32="tf32" in parts,
                  channels_last="nhwc" in parts, compile="compile" in parts,
                  cuda_graphs="cudagraphs" in parts)
    fmt = "tf32" if precision == "fp32" and "tf32" in parts else precision
    return fmt, kwargs


def tolerance(fmt):
    return max(FP32_FLOOR, ROUNDOFFS_ALLOWED * UNIT_ROUNDOFF[fmt])


def build_exact(args, device):
    model, diffusion = su.create_model_and_diffusion(
        **su.args_to_dict(args, su.model_and_diffusion_defaults().keys()))
    if args.model_path == "random":
        su.randomize_weights_(model, seed=args.seed)
    else:
        load_checkpoint(model, args.model_path)
    return model.float().to(device).eval(), diffusion


def build_path(exact_model, spec, args):
    """A copy of the exact network prepared as ``spec`` says, its guidance, and its TF32 context."""
    fmt, kwargs = parse_path(spec)
    model = copy.deepcopy(exact_model)
    if kwargs is None:
        model.convert_to_fp16()
        fast, allow_tf32 = False, False
    else:
        prepare_model(model, **kwargs)
        fast, allow_tf32 = True, kwargs["allow_tf32"]
    set_tf32(False)  # prepare_model set TF32 process-wide; each path's steps set their own
    guidance = build_guidance(model, args, fast)
    return model, guidance, (lambda: tf32_mode(allow_tf32)), fmt


def build_guidance(model, args, fast):
    """The exact or fast guidance, on at every compared step; the user's other settings."""
    if strategy(args) == pag.SAG_STRATEGY:
        return sag_class(fast_attention=fast)(
            model, guide_scale=args.guide_scale, guide_start=10 ** 9, blur_sigma=args.blur_sigma,
            sel_attn_block=args.sel_attn_block, sel_attn_depth=args.sel_attn_depth,
            sag_heads=args.sag_heads, keep_intermediates=True)
    return pag_class(fast_attention=fast)(
        model, guide_scale=args.guide_scale, drop_layers=pag_flags.layers(args), strategy=strategy(args),
        noise_scale=args.noise_scale, seg_sigma=args.seg_blur_sigma,
        drop_layer_randomly=args.drop_layer_randomly, reproduce_rng=args.pag_reproduce_rng,
        keep_intermediates=True)


def describe_guidance(args):
    name = strategy(args)
    if name == pag.SAG_STRATEGY:
        return (f"SAG on every step (scale {args.guide_scale:g}, blur sigma {args.blur_sigma:g}, "
                f"{args.sel_attn_block} {args.sel_attn_depth}, heads: {args.sag_heads})")
    detail = f"sigma {args.seg_blur_sigma:g}" if name == pag.SEG else f"noise_scale {args.noise_scale:g}"
    return (f"{'SEG' if name == pag.SEG else 'PAG'} ({name}) on every step (scale {args.guide_scale:g}, "
            f"{detail}, layers {' '.join(pag_flags.layers(args))})")


def inputs(args, device):
    gen = th.Generator(device="cpu").manual_seed(args.seed)
    size = args.image_size
    noise = th.randn(args.batch_size, 3, size, size, generator=gen).to(device)
    kwargs = {}
    if args.class_cond:
        kwargs["y"] = th.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)
    return noise, kwargs


def report(results, args, device):
    head = ("| path | steps | mask agreement (mean / worst step) | eps rel. err (worst step) | "
            "eps max-rel. err | 2nd-pass eps rel. err | guided eps rel. err | tolerance (eps) | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    failed = []
    for spec, (fmt, s) in results.items():
        has_mask = s["mean_mask_agreement"] is not None  # SAG; PAG / SEG: both passes' eps
        ok = s["max_eps_rel_err"] <= tolerance(fmt) and (
            s["mean_mask_agreement"] >= MIN_MASK_AGREEMENT if has_mask
            else s["max_second_eps_rel_err"] <= tolerance(fmt))
        if not ok:
            failed.append(spec)
        mask = (f"{100 * s['mean_mask_agreement']:.2f}% / {100 * s['min_mask_agreement']:.2f}%"
                if has_mask else "- (no mask)")
        lines.append(
            f"| {spec} | {s['steps']} | {mask} | {s['max_eps_rel_err']:.2e} | "
            f"{s['max_eps_max_rel_err']:.2e} | {s['max_second_eps_rel_err']:.2e} | "
            f"{s['max_guided_eps_rel_err']:.2e} | {tolerance(fmt):.1e} ({fmt}) | {'ok' if ok else 'FAIL'} |")
    what = "random weights" if args.model_path == "random" else args.model_path
    notes = [
        f"Machine: {describe_machine(device)}. Model: {what}, {args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, respacing {args.timestep_respacing}, {describe_guidance(args)}; "
        "reference: exact fp32 (TF32 off).",
        "Teacher-forced: each step starts both paths from the exact trajectory's x_t. Errors are "
        "||fast - exact|| / ||exact|| (max-rel.: max|fast - exact| / max|exact|); the 2nd pass is "
        "SAG's degraded input or PAG's / SEG's perturbed network; SAG's guided eps also moves where "
        f"a mask position flips. Tolerance: first-pass eps within {ROUNDOFFS_ALLOWED} unit roundoffs "
        "of the format, and SAG mask agreement >= 99% over the trajectory (PAG / SEG: the 2nd "
        "pass's eps within the same tolerance).",
    ]
    return "\n".join(lines), notes, failed


def main(argv=None):
    args = parse_args(argv)
    device = th.device(args.device if args.device != "auto" else
                       ("cuda" if th.cuda.is_available() else "cpu"))
    specs = (args.paths or DEFAULT_PATHS["cuda" if device.type == "cuda" else "cpu"]).split(",")
    try:
        for spec in specs:
            parse_path(spec)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if args.guide_scale == 1.0:
        if strategy(args) == pag.SAG_STRATEGY:
            sys.exit("error: --guide_scale 1 turns SAG off: nothing to compare (use e.g. 1.5)")
        sys.exit("error: --guide_scale 1 turns PAG / SEG off: nothing to compare (use e.g. 4.0)")
    try:
        exact_model, diffusion = build_exact(args, device)
        paths, formats = {}, {}
        for spec in specs:  # copies of the exact network, taken before its probe is attached
            *paths[spec], formats[spec] = build_path(exact_model, spec, args)
        exact = (exact_model, build_guidance(exact_model, args, fast=False), lambda: tf32_mode(False))
    except (CheckpointError, ValueError) as exc:  # flags that do not fit the checkpoint / block
        sys.exit(f"error: {str(exc).strip().splitlines()[0]}")
    noise, model_kwargs = inputs(args, device)
    rows = compare_guided_steps(diffusion, exact, paths, noise, model_kwargs, steps=args.steps or None)
    if args.per_step:
        for spec, steps in rows.items():
            for r in steps:
                mask = "" if r["mask_agreement"] is None else f"mask {100 * r['mask_agreement']:.2f}%, "
                print(f"[{spec}] step {r['step']}: {mask}eps {r['eps_rel_err']:.2e}, "
                      f"2nd-pass eps {r['second_eps_rel_err']:.2e}, guided eps {r['guided_eps_rel_err']:.2e}")
    for _, guidance, _ in [exact, *paths.values()]:
        guidance.close()
    results = {spec: (formats[spec], summarize(steps)) for spec, steps in rows.items()}
    text, notes, failed = report(results, args, device)
    print("\n".join(notes))
    print(text)
    if args.out:
        command = "python scripts/compare_fast_path.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_markdown(args.out, "Agreement", command, notes, text)
    if args.check and failed:
        sys.exit(f"error: {', '.join(failed)} outside tolerance (see the table)")


if __name__ == "__main__":
    main()
