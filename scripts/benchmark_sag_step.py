"""Cost of one SAG DDIM step relative to one plain DDIM step, measured in the same run.

A benchmark, not a test: it prints timings and their ratio and asserts nothing. The default is
a small CPU configuration; any model flag can be overridden (e.g. ``--image_size 128
--num_channels 256 ... --device cuda``). Weights are random: timing needs no trained model.

    python scripts/benchmark_sag_step.py [--batch_size 8] [--repeats 10] [--threads 2]
"""

import argparse
import os
import sys
import time

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.sag import SelfAttentionGuidance  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

SMALL_CPU = dict(image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2",
                 attention_resolutions="16,8", num_heads=4, class_cond=True, learn_sigma=True,
                 resblock_updown=True, use_scale_shift_norm=True, timestep_respacing="ddim25")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = model_and_diffusion_defaults()
    defaults.update(SMALL_CPU)
    defaults.update(batch_size=8, repeats=10, warmup=2, threads=0, device="cpu",
                    sel_attn_block="output", sel_attn_depth=2, blur_sigma=9.0, guide_scale=1.5)
    add_dict_to_argparser(parser, defaults)
    return parser.parse_args()


def time_step(diffusion, model, x, t, kwargs, guidance, repeats, warmup, device):
    def step():
        with th.no_grad():
            diffusion.ddim_sample(model, x, t, model_kwargs=kwargs, guidance=guidance)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        th.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        th.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    args = parse_args()
    if args.threads:
        th.set_num_threads(args.threads)
    device = th.device(args.device)
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    model.to(device).eval()
    if args.use_fp16:
        model.convert_to_fp16()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = th.randn(*shape, device=device)
    t = th.full((args.batch_size,), diffusion.num_timesteps - 1, device=device, dtype=th.long)
    kwargs = {"y": th.randint(0, 1000, (args.batch_size,), device=device)} if args.class_cond else {}
    sag = SelfAttentionGuidance(model, guide_scale=args.guide_scale, guide_start=diffusion.num_timesteps,
                                blur_sigma=args.blur_sigma, sel_attn_block=args.sel_attn_block,
                                sel_attn_depth=args.sel_attn_depth)
    plain = time_step(diffusion, model, x, t, kwargs, None, args.repeats, args.warmup, device)
    guided = time_step(diffusion, model, x, t, kwargs, sag, args.repeats, args.warmup, device)
    sag.close()
    print(f"device {device}, threads {th.get_num_threads()}, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, probe {args.sel_attn_block} {args.sel_attn_depth}")
    print(f"plain DDIM step: {plain * 1e3:.1f} ms")
    print(f"SAG DDIM step:   {guided * 1e3:.1f} ms")
    print(f"SAG / plain:     {guided / plain:.3f}")


if __name__ == "__main__":
    main()
