"""Pictures of what SAG does, from one noise and one set of labels.

Writes into ``--out_dir``:
  * ``sag_step_<t>.png`` for each chosen respaced step t: one row per image, columns
    x_t | predicted x_0 | attention mask | blurred x_0 | degraded input x̄_t;
  * ``sag_comparison.png``: rows = no guidance / SAG / classifier guidance / SAG + classifier
    guidance, the same noise and labels in every row (columns = images).
Small images are enlarged by pixel repetition (``--zoom``; default: tiles of at least 128 px).

Takes the flags of ``classifier_sample.py`` (model, classifier, SAG); for example, with the
bundled default: ``source configs/digits.sh; python scripts/visualize_sag.py $SAG_FLAGS
$MODEL_FLAGS $CLASSIFIER_FLAGS --model_path $MODEL_PATH --timestep_respacing 50 --steps 40,25,10``.
"""

import os
import sys

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, sampling  # noqa: E402
from guided_diffusion.fast_path import pair_overlap  # noqa: E402
from guided_diffusion.image_io import make_grid, to_uint8_nhwc, upscale_nearest, write_png  # noqa: E402


def parse_args(argv=None):
    parser = sampling.create_argparser("classifier")
    parser.description = __doc__
    parser.add_argument("--steps", default="",
                        help="respaced steps to show, comma separated (default: 3 spread over the run)")
    parser.add_argument("--num_images", type=int, default=8, help="images per picture")
    parser.add_argument("--out_dir", default="sag_pictures", help="folder for the PNGs")
    parser.add_argument("--zoom", type=int, default=0,
                        help="pixel-repeat factor for the PNGs (default: tiles of at least 128 px)")
    args = parser.parse_args(argv)
    if args.zoom < 0:
        parser.error(f"--zoom {args.zoom}: must be 0 (automatic) or a positive factor")
    if args.sampler is not None or args.sampler_steps is not None:
        parser.error("--sampler/--sampler_steps: this script draws DDPM or DDIM runs only "
                     "(--use_ddim, --timestep_respacing)")
    args.zoom = args.zoom or max(1, 128 // args.image_size)
    args.batch_size = args.num_images
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


def run(args, diffusion, model_fn, cond_fn, guidance, labels, noise, record=None):
    """One sampling run from fixed noise; optionally records SAG intermediates at steps."""
    th.manual_seed(args.seed)
    pair_overlap(guidance, cond_fn)  # the SAG-only run computes no classifier gradient
    loop = diffusion.ddim_sample_loop_progressive if args.use_ddim else diffusion.p_sample_loop_progressive
    img = noise
    out = None
    for i, out in zip(range(diffusion.num_timesteps - 1, -1, -1),
                      loop(model_fn, tuple(noise.shape), noise=noise, clip_denoised=args.clip_denoised,
                           model_kwargs={"y": labels}, cond_fn=cond_fn, device=noise.device,
                           guidance=guidance)):
        if record is not None and i in record and "sag" in out:
            inter = out["sag"]
            record[i] = np.concatenate([
                to_uint8_nhwc(img)[:, None], to_uint8_nhwc(out["pred_xstart"])[:, None],
                mask_image(inter["mask"])[:, None], to_uint8_nhwc(inter["blurred"])[:, None],
                to_uint8_nhwc(inter["x_bar"])[:, None]], axis=1)
        img = out["sample"]
    return to_uint8_nhwc(out["sample"])


def main(argv=None):
    args = parse_args(argv)
    if args.seed is None:
        args.seed = 0
    dist_util.setup_dist()
    wanted_cg = args.classifier_guidance
    args.classifier_guidance = True  # build the gradient function; each run picks what it uses
    try:
        diffusion, model_fn, cond_fn, guidance = sampling.build_sampler(args, "classifier")
    except sampling.UsageError as exc:
        raise SystemExit(f"error: {exc}")
    guidance.keep_intermediates = True
    device = dist_util.dev()
    gen = th.Generator().manual_seed(args.seed)
    labels = th.randint(0, args.num_classes, (args.num_images,), generator=gen).to(device)
    noise = th.randn(args.num_images, 3, args.image_size, args.image_size, generator=gen).to(device)
    os.makedirs(args.out_dir, exist_ok=True)

    record = {s: None for s in chosen_steps(args, diffusion.num_timesteps)}
    rows = [
        ("no guidance", run(args, diffusion, model_fn, None, None, labels, noise)),
        ("SAG", run(args, diffusion, model_fn, None, guidance, labels, noise, record)),
        ("classifier guidance", run(args, diffusion, model_fn, cond_fn, None, labels, noise)),
        ("SAG + classifier guidance", run(args, diffusion, model_fn, cond_fn, guidance, labels, noise)),
    ]
    for step, panel in record.items():
        if panel is None:
            print(f"step {step}: SAG was not active (guide_start {args.guide_start}); no panel")
            continue
        path = os.path.join(args.out_dir, f"sag_step_{step}.png")
        grid = make_grid(panel.reshape(-1, *panel.shape[2:]), ncols=panel.shape[1])
        write_png(path, upscale_nearest(grid, args.zoom))
        print(f"wrote {path} (columns: x_t, predicted x_0, mask, blurred x_0, degraded input)")
    path = os.path.join(args.out_dir, "sag_comparison.png")
    grid = make_grid(np.concatenate([r for _, r in rows]), ncols=args.num_images)
    write_png(path, upscale_nearest(grid, args.zoom))
    print(f"wrote {path} (rows: {'; '.join(name for name, _ in rows)}; labels {labels.tolist()})")
    args.classifier_guidance = wanted_cg


if __name__ == "__main__":
    main()
