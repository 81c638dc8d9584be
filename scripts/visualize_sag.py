"""Pictures of what SAG, PAG and SEG do, from one noise and one set of labels.

Writes into ``--out_dir``:
  * ``sag_step_<t>.png`` for each chosen respaced step t: one row per image, columns
    x_t | predicted x_0 | attention mask | blurred x_0 | degraded input x̄_t;
  * ``pag_step_<t>.png`` / ``seg_step_<t>.png`` (``--guidances`` with pag / seg): one row per
    image, columns x_t | x_0 of the plain pass | x_0 of the perturbed pass | their difference
    (plain - perturbed, scaled per image to the full grey range, mid-grey = 0) | guided x_0;
  * ``comparison.png``: rows = no guidance, each guidance, classifier guidance, each guidance +
    classifier guidance, the same noise and labels in every row (columns = images).
Small images are enlarged by pixel repetition (``--zoom``; default: tiles of at least 128 px).

Takes the flags of ``classifier_sample.py`` (model, classifier, SAG). PAG and SEG rows come with
``--guidances sag,pag,seg``; their settings: ``--drop_layers``, ``--noise_scale`` and
``--pag_scale`` (PAG), ``--seg_layers``, ``--seg_blur_sigma`` and ``--seg_scale`` (SEG; guide
scale = 1 + seg_scale); both guide every step. With the bundled default: ``source
configs/digits.sh; python scripts/visualize_sag.py $SAG_FLAGS $MODEL_FLAGS $CLASSIFIER_FLAGS
--model_path $MODEL_PATH --timestep_respacing 50 --steps 40,25,10 --guidances sag,pag,seg
--drop_layers ... --seg_layers ...`` (the layers of ``configs/digits.sh``).
"""

import os
import sys

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, pag, sampling  # noqa: E402
from guided_diffusion.fast_path import fast_path_flags, pag_class, pair_overlap  # noqa: E402
from guided_diffusion.guidance import find_unet  # noqa: E402
from guided_diffusion.image_io import make_grid, to_uint8_nhwc, upscale_nearest, write_png  # noqa: E402
from guided_diffusion.pag_flags import PAG_GUIDE_SCALE  # noqa: E402

GUIDANCES = {"sag": "SAG", "pag": "PAG", "seg": "SEG"}
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
    parser.add_argument("--guidances", default="sag",
                        help="comma list of sag, pag, seg: the guided rows and step panels")
    parser.add_argument("--pag_scale", type=float, default=PAG_GUIDE_SCALE,
                        help="PAG's guide scale (1 + the paper's) for the pag rows")
    args = parser.parse_args(argv)
    if args.zoom < 0:
        parser.error(f"--zoom {args.zoom}: must be 0 (automatic) or a positive factor")
    args.zoom = args.zoom or max(1, 128 // args.image_size)
    args.batch_size = args.num_images
    args.guidances = args.guidances.split(",")
    unknown = [g for g in args.guidances if g not in GUIDANCES]
    if unknown or len(set(args.guidances)) != len(args.guidances):
        parser.error(f"--guidances {','.join(args.guidances)}: a comma list of {', '.join(GUIDANCES)}")
    if args.guidance_strategies is not None:
        parser.error("--guidance_strategies: choose the guided rows with --guidances sag,pag,seg "
                     "(PAG / SEG then guide every step)")
    return args


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
    """``{name: guidance}`` for ``--guidances`` (SAG from the SAG flags; PAG / SEG on every step)."""
    unet = find_unet(diffusion, model_fn, {})
    cls = pag_class(**fast_path_flags(args))
    built = {}
    try:
        for name in args.guidances:
            if name == "sag":
                built[name] = sag_guidance
            elif name == "pag":
                built[name] = cls(unet, guide_scale=args.pag_scale, drop_layers=args.drop_layers,
                                  strategy=pag.PAG, noise_scale=args.noise_scale,
                                  reproduce_rng=args.pag_reproduce_rng)
            else:
                seg_scale = 3.0 if args.seg_scale is None else args.seg_scale
                built[name] = cls(unet, guide_scale=1.0 + seg_scale, drop_layers=args.seg_layers,
                                  strategy=pag.SEG, seg_sigma=args.seg_blur_sigma)
    except ValueError as exc:
        flag = "--seg_layers" if name == "seg" else "--drop_layers"
        raise SystemExit(f"error: {name}: {str(exc).replace('--drop_layers', flag)}")
    for guidance in built.values():
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
    rows = [("no guidance", run(args, diffusion, model_fn, None, None, labels, noise))]
    records = {}
    for name, guidance in guidances.items():
        records[name] = {s: None for s in steps}
        rows.append((GUIDANCES[name], run(args, diffusion, model_fn, None, guidance, labels, noise,
                                          records[name])))
    rows.append(("classifier guidance", run(args, diffusion, model_fn, cond_fn, None, labels, noise)))
    for name, guidance in guidances.items():
        rows.append((f"{GUIDANCES[name]} + classifier guidance",
                     run(args, diffusion, model_fn, cond_fn, guidance, labels, noise)))
    for name, record in records.items():
        for step, panel in record.items():
            if panel is None:
                print(f"step {step}: {GUIDANCES[name]} was not active (SAG: --guide_start "
                      f"{args.guide_start}); no panel")
                continue
            path = os.path.join(args.out_dir, f"{name}_step_{step}.png")
            grid = make_grid(panel.reshape(-1, *panel.shape[2:]), ncols=panel.shape[1])
            write_png(path, upscale_nearest(grid, args.zoom))
            print(f"wrote {path} (columns: {COLUMNS['sag' if name == 'sag' else 'pag']})")
    path = os.path.join(args.out_dir, "comparison.png")
    grid = make_grid(np.concatenate([r for _, r in rows]), ncols=args.num_images)
    write_png(path, upscale_nearest(grid, args.zoom))
    print(f"wrote {path} (rows: {'; '.join(name for name, _ in rows)}; labels {labels.tolist()})")
    for guidance in guidances.values():
        guidance.close()
    args.classifier_guidance = wanted_cg


if __name__ == "__main__":
    main()
