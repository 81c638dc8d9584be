"""Pictures of what SAG, PAG and SEG do, from one noise and one set of labels.

Writes into ``--out_dir``:
  * ``sag_step_<t>.png`` for each chosen respaced step t: one row per image, columns
    x_t | predicted x_0 | attention mask | blurred x_0 | degraded input x̄_t;
  * ``pag_step_<t>.png`` / ``seg_step_<t>.png`` for each ``--compare_flags`` guidance (PAG, SEG):
    one row per image, columns x_t | x_0 of the plain pass | x_0 of the perturbed pass | their
    difference (plain - perturbed, scaled per image to the full grey range, mid-grey = 0) |
    guided x_0;
  * ``comparison.png``: rows = no guidance, SAG, each ``--compare_flags`` guidance, classifier
    guidance, each guidance + classifier guidance, the same noise and labels in every row
    (columns = images).
Small images are enlarged by pixel repetition (``--zoom``; default: tiles of at least 128 px).
Under ``mpiexec -n N`` the rows are shared out among the ranks (the same pictures).

Takes the flags of ``classifier_sample.py`` (model, classifier, SAG). ``--compare_flags "FLAGS"``
(repeatable) adds a guidance given by the PAG / SEG flags of ``classifier_sample.py`` as one
string, split on whitespace as the shell splits an unquoted variable (so JSON without spaces),
e.g. ``--compare_flags "$PAG_FLAGS" --compare_flags "$SEG_FLAGS"``. With the bundled
default: ``source configs/digits.sh; python scripts/visualize_sag.py $SAG_FLAGS $MODEL_FLAGS
$CLASSIFIER_FLAGS --model_path $MODEL_PATH --timestep_respacing 50 --steps 40,25,10
--compare_flags "$PAG_FLAGS" --compare_flags "$SEG_FLAGS"``.
"""

import os
import sys

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, pag, pag_flags, sampling  # noqa: E402
from guided_diffusion.fast_path import fast_path_flags, pair_overlap  # noqa: E402
from guided_diffusion.guidance import find_unet  # noqa: E402
from guided_diffusion.image_io import make_grid, to_uint8_nhwc, upscale_nearest, write_png  # noqa: E402

# Row label and file prefix per guidance strategy.
LABELS = {pag.SAG_STRATEGY: ("SAG", "sag"), pag.PAG: ("PAG", "pag"), pag.SEG: ("SEG", "seg"),
          pag.MASK: ("PAG (attention_mask)", "pag_mask")}
COLUMNS = {
    "sag": "x_t, predicted x_0, mask, blurred x_0, degraded input",
    "pag": "x_t, plain x_0, perturbed x_0, difference (per image scale), guided x_0",
}


def parse_args(argv=None):
    parser = sampling.create_argparser("classifier")
    parser.description = __doc__
    parser.add_argument("--steps", default="",
                        help="respaced steps to show, comma separated (default: 3 spread over the run)")
    parser.add_argument("--num_images", type=int, default=8, help="images per picture")
    parser.add_argument("--out_dir", default="sag_pictures", help="folder for the PNGs")
    parser.add_argument("--zoom", type=int, default=0,
                        help="pixel-repeat factor for the PNGs (default: tiles of at least 128 px)")
    parser.add_argument("--compare_flags", action="append", default=[], metavar='"FLAGS"',
                        help="another guided row: PAG / SEG flags of classifier_sample.py as one "
                        "string (--guidance_strategies ... --drop_layers ... --guide_scale ...); repeatable")
    args = parser.parse_args(argv)
    if args.zoom < 0:
        parser.error(f"--zoom {args.zoom}: must be 0 (automatic) or a positive factor")
    if args.sampler is not None or args.sampler_steps is not None:
        parser.error("--sampler/--sampler_steps: this script draws DDPM or DDIM runs only "
                     "(--use_ddim, --timestep_respacing)")
    args.zoom = args.zoom or max(1, 128 // args.image_size)
    args.batch_size = args.num_images
    if args.guidance_strategies is not None:
        parser.error("--guidance_strategies: the main flags give the SAG row; pass PAG / SEG flags "
                     'as --compare_flags "FLAGS"')
    args.compared = [compared_args(flags) for flags in args.compare_flags]
    return args


def compared_args(flags):
    """The sampling flags of one ``--compare_flags`` string (defaults elsewhere), validated; a
    one-line SystemExit otherwise. The string is split on whitespace, as the shell splits an
    unquoted ``$PAG_FLAGS`` (no quote removal: JSON goes in without spaces)."""
    compared_parser = sampling.create_argparser("classifier")

    def refuse(message):
        raise ValueError(message)

    compared_parser.error = refuse  # argparse's usage dump would hide the one line that matters
    try:
        compared = compared_parser.parse_args(flags.split())
        if not pag_flags.requested(compared):
            raise ValueError("give --guidance_strategies (PAG / SEG) in it")
        pag_flags.validate(compared)
    except ValueError as exc:
        raise SystemExit(f"error: --compare_flags {flags!r}: {exc}")
    return compared


def chosen_steps(args, num_steps):
    if args.steps:
        steps = [int(s) for s in args.steps.split(",")]
        bad = [s for s in steps if not 0 <= s < num_steps]
        if bad:
            raise SystemExit(f"error: --steps {bad} outside 0..{num_steps - 1} (respaced steps)")
        return steps
    return [num_steps * 4 // 5, num_steps // 2, num_steps // 5]


def mask_image(mask):
    """0/1 mask [N, C, H, W] -> grey uint8 NHWC."""
    grey = (mask[:, :1] * 255).to(th.uint8).repeat(1, 3, 1, 1)
    return grey.permute(0, 2, 3, 1).cpu().numpy()


def scaled_difference(a, b):
    """``a - b`` scaled per image so that its largest magnitude is full white / black."""
    diff = a - b
    peak = diff.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return diff / peak


def step_panel(x_t, out):
    """The columns of one step's panel (see the module doc), uint8 [N, columns, H, W, 3]."""
    if "sag" in out:
        inter = out["sag"]
        columns = [to_uint8_nhwc(x_t), to_uint8_nhwc(out["pred_xstart"]), mask_image(inter["mask"]),
                   to_uint8_nhwc(inter["blurred"]), to_uint8_nhwc(inter["x_bar"])]
    else:
        plain, perturbed = out["pred_xstart"], out["pag"]["perturbed_pred_xstart"]
        columns = [to_uint8_nhwc(x) for x in (x_t, plain, perturbed, scaled_difference(plain, perturbed),
                                              out["guided_pred_xstart"])]
    return np.stack(columns, axis=1)


def run(args, diffusion, model_fn, cond_fn, guidance, labels, noise, record=None):
    """One sampling run from fixed noise; optionally records the guidance's panels at steps."""
    th.manual_seed(args.seed)
    pair_overlap(guidance, cond_fn)  # a run without classifier guidance computes no gradient
    loop = diffusion.ddim_sample_loop_progressive if args.use_ddim else diffusion.p_sample_loop_progressive
    img = noise
    out = None
    for i, out in zip(range(diffusion.num_timesteps - 1, -1, -1),
                      loop(model_fn, tuple(noise.shape), noise=noise, clip_denoised=args.clip_denoised,
                           model_kwargs={"y": labels}, cond_fn=cond_fn, device=noise.device,
                           guidance=guidance)):
        if record is not None and i in record and ("sag" in out or "pag" in out):
            record[i] = step_panel(img, out)
        img = out["sample"]
    return to_uint8_nhwc(out["sample"])


def build_guidances(args, diffusion, model_fn, sag_guidance):
    """``[(label, file prefix, guidance)]``: SAG from the main flags, then each ``--compare_flags``."""
    unet = find_unet(diffusion, model_fn, {})
    built = [(*LABELS[pag.SAG_STRATEGY], sag_guidance)]
    for flags, compared in zip(args.compare_flags, args.compared):
        try:
            guidance = pag_flags.build_guidance(compared, unet, fast_path_flags(args))
        except ValueError as exc:
            raise SystemExit(f"error: --compare_flags {flags!r}: {exc}")
        built.append((*LABELS[next(iter(compared.guidance_strategies))], guidance))
    prefixes = [prefix for _, prefix, _ in built]
    for i, (label, prefix, guidance) in enumerate(built):
        if prefixes.count(prefix) > 1:  # two PAG rows, say: number their files
            built[i] = (f"{label} {prefixes[:i + 1].count(prefix)}", f"{prefix}{prefixes[:i + 1].count(prefix)}",
                        guidance)
        guidance.keep_intermediates = True
    return built


def main(argv=None):
    args = parse_args(argv)
    if args.seed is None:
        args.seed = 0
    dist_util.setup_dist()
    wanted_cg = args.classifier_guidance
    args.classifier_guidance = True  # build the gradient function; each run picks what it uses
    try:
        diffusion, model_fn, cond_fn, sag_guidance = sampling.build_sampler(args, "classifier")
    except sampling.UsageError as exc:
        raise SystemExit(f"error: {exc}")
    guidances = build_guidances(args, diffusion, model_fn, sag_guidance)
    device = dist_util.dev()
    gen = th.Generator().manual_seed(args.seed)
    labels = th.randint(0, args.num_classes, (args.num_images,), generator=gen).to(device)
    noise = th.randn(args.num_images, 3, args.image_size, args.image_size, generator=gen).to(device)
    os.makedirs(args.out_dir, exist_ok=True)

    steps = chosen_steps(args, diffusion.num_timesteps)
    # The picture's rows: (label, cond_fn, guidance, file prefix of its step panels or None).
    plan = [("no guidance", None, None, None)]
    plan += [(label, None, guidance, prefix) for label, prefix, guidance in guidances]
    plan += [("classifier guidance", cond_fn, None, None)]
    plan += [(f"{label} + classifier guidance", cond_fn, guidance, None) for label, _, guidance in guidances]
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    mine = {}  # under mpiexec each rank samples every world-th row (same rows for any rank count)
    for i, (_, cond, guidance, prefix) in enumerate(plan):
        if i % world == rank:
            record = {s: None for s in steps} if prefix else None
            mine[i] = (run(args, diffusion, model_fn, cond, guidance, labels, noise, record), record)
    dist_util.barrier()  # wait without spinning, then collect every rank's rows
    done = {}
    for r in range(world):
        done.update(dist_util.broadcast_object(mine if r == rank else None, root=r))
    for _, _, guidance in guidances:
        guidance.close()
    args.classifier_guidance = wanted_cg
    if rank != 0:
        return
    rows = [(label, done[i][0]) for i, (label, *_) in enumerate(plan)]
    records = {prefix: (label, done[i][1]) for i, (label, _, _, prefix) in enumerate(plan) if prefix}
    for prefix, (label, record) in records.items():
        for step, panel in record.items():
            if panel is None:
                print(f"step {step}: {label} was not active (SAG: --guide_start; PAG / SEG: the "
                      "--guidance_strategies window); no panel")
                continue
            path = os.path.join(args.out_dir, f"{prefix}_step_{step}.png")
            grid = make_grid(panel.reshape(-1, *panel.shape[2:]), ncols=panel.shape[1])
            write_png(path, upscale_nearest(grid, args.zoom))
            print(f"wrote {path} (columns: {COLUMNS['sag' if prefix == 'sag' else 'pag']})")
    path = os.path.join(args.out_dir, "comparison.png")
    grid = make_grid(np.concatenate([r for _, r in rows]), ncols=args.num_images)
    write_png(path, upscale_nearest(grid, args.zoom))
    print(f"wrote {path} (rows: {'; '.join(name for name, _ in rows)}; labels {labels.tolist()})")


if __name__ == "__main__":
    main()
