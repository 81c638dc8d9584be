"""Benchmark plain and SAG DDIM sampling steps: exact fp32, original-style fp16, fast path.

Random weights in the published 128 / 256 layouts (timings need no trained weights). For every
(layout, batch size, path): ``warmup`` untimed steps, then ``steps`` timed sampler steps, plain
and with SAG (two UNet passes + mask + blur per step). GPU: CUDA-event timing; CPU: perf_counter.
FLOPs per image and forward are counted with ``torch.utils.flop_counter`` on the meta device.
The table is printed last; ratios are measured in this run, never asserted.

    python scripts/benchmark_sampling.py                      # 128 and 256, batch 16 and 64
    python scripts/benchmark_sampling.py --layouts 256 --batch_sizes 64 --out docs/benchmarks.md
    python scripts/benchmark_sampling.py --tiny               # CPU smoke test (< 1 min)
    python scripts/benchmark_sampling.py --layouts 128 --batch_sizes 16 --classifier_guidance True

With ``--classifier_guidance True`` it also times SAG + classifier guidance (OpenAI's classifier
layout at the model's size, random weights); on the fast path both with the classifier gradient
overlapping SAG's second pass and sequentially, so the overlap gain is measured in one run.
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch as th  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from guided_diffusion.bench_report import append_markdown, describe_machine  # noqa: E402
from guided_diffusion.fast_path import (  # noqa: E402
    ClassifierGradientOverlap,
    FastSelfAttentionGuidance,
    pair_overlap,
    prepare_model,
    set_tf32,
)
from guided_diffusion.sag import SelfAttentionGuidance  # noqa: E402
from guided_diffusion.sampling import classifier_cond_fn  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    randomize_weights_,
    str2bool,
)

# Model flags of the published command lines (shared/spec/CLI.md); SAG block as in the README.
COMMON = dict(attention_resolutions="32,16,8", diffusion_steps=1000, learn_sigma=True,
              noise_schedule="linear", num_channels=256, num_res_blocks=2, resblock_updown=True,
              use_scale_shift_norm=True)
LAYOUTS = {
    "128": (dict(COMMON, image_size=128, class_cond=True, num_heads=4), ("output", 8), 0.61),
    "256": (dict(COMMON, image_size=256, class_cond=False, num_head_channels=64), ("output", 2), 2.24),
    "tiny": (dict(image_size=32, num_channels=32, channel_mult="1,1,1", attention_resolutions="32,16,8",
                  num_heads=4, num_res_blocks=1, learn_sigma=True, class_cond=True), ("output", 2), None),
}
PATHS = ("exact", "fp16", "fast")
# Classifier flags for --classifier_guidance: OpenAI's published classifiers (128/256) are
# classifier_defaults() at the model's image size; the tiny one is as small as the tiny UNet.
CLASSIFIERS = {
    "128": dict(image_size=128),
    "256": dict(image_size=256),
    "tiny": dict(image_size=32, classifier_width=32, classifier_depth=1,
                 classifier_attention_resolutions="16,8"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="128,256", help="comma list of 128, 256, tiny")
    p.add_argument("--batch_sizes", default="16,64")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of exact, fp16, fast")
    p.add_argument("--steps", type=int, default=20, help="timed sampler steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (plain and SAG) first")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="peak dense TFLOP/s for MFU (bf16: H100 SXM / H200 ~989)")
    p.add_argument("--dtype", default="bf16", help="fast path autocast dtype: bf16, fp16, fp32")
    p.add_argument("--compile", type=str2bool, default=None, help="fast path: torch.compile (default: on GPU)")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--cuda_graphs", type=str2bool, default=False)
    p.add_argument("--channels_last", type=str2bool, default=None, help="fast path (default: on GPU)")
    p.add_argument("--allow_tf32", type=str2bool, default=True, help="fast path only")
    p.add_argument("--guide_scale", type=float, default=1.5)
    p.add_argument("--blur_sigma", type=float, default=9.0)
    p.add_argument("--classifier_guidance", type=str2bool, default=False,
                   help="also time SAG + classifier guidance (fast path: with and without overlap)")
    p.add_argument("--classifier_scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: tiny model, batch 2, 2 steps, 1 warm-up, exact/fp16/fast")
    p.add_argument("--out", default="", help="append the table (markdown) to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.layouts, args.batch_sizes, args.steps, args.warmup = "tiny", "2", 2, 1
        args.device = "cpu" if args.device == "auto" else args.device
        args.threads = args.threads or 1
    return args


def pick_device(name):
    if name == "auto":
        name = "cuda" if th.cuda.is_available() else "cpu"
    return th.device(name)


def build(layout, device, seed=0):
    flags, _, _ = LAYOUTS[layout]
    kwargs = model_and_diffusion_defaults()
    kwargs.update(flags, timestep_respacing="250")
    th.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**kwargs)
    randomize_weights_(model)
    return model.to(device).eval(), diffusion, kwargs


def counted_flops(layout):
    """FLOPs of one forward of one image (convs and matmuls), counted on the meta device."""
    flags, _, _ = LAYOUTS[layout]
    kwargs = model_and_diffusion_defaults()
    kwargs.update(flags)
    with th.device("meta"):
        model, _ = create_model_and_diffusion(**kwargs)
        x = th.zeros(1, 3, kwargs["image_size"], kwargs["image_size"])
        t = th.zeros(1, dtype=th.long)
        y = th.zeros(1, dtype=th.long) if kwargs["class_cond"] else None
        with FlopCounterMode(display=False) as counter, th.no_grad():
            model(x, t, y)
    return counter.get_total_flops()


class Timer:
    """CUDA events on GPU, perf_counter on CPU; returns seconds."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def prepare_path(path, model, args, device, compiled=True):
    """Turn a fresh fp32 network into the path's network; returns the guidance class.

    ``compiled=False`` (the classifier, which is differentiated every step, as in the sampler)
    leaves out compilation and CUDA graphs."""
    set_tf32(False)
    if path == "fp16":  # OpenAI's --use_fp16: fp16 torso, einsum attention, eager
        model.convert_to_fp16()
        return SelfAttentionGuidance
    if path == "fast":
        on_gpu = device.type == "cuda"
        compile = (on_gpu if args.compile is None else args.compile) and compiled
        prepare_model(model, fast_attention=True, dtype=args.dtype, allow_tf32=args.allow_tf32,
                      channels_last=on_gpu if args.channels_last is None else args.channels_last,
                      compile=compile, compile_mode=args.compile_mode,
                      cuda_graphs=args.cuda_graphs and compiled)
        return FastSelfAttentionGuidance
    return SelfAttentionGuidance


def build_cond_fn(layout, path, args, device):
    """A random-weight classifier for the layout, prepared like the path's UNet, and the
    sampler's ``cond_fn`` (gradient of the selected log-probability)."""
    flags = classifier_defaults()
    flags.update(CLASSIFIERS[layout])
    th.manual_seed(2)
    classifier = randomize_weights_(create_classifier(**flags)).to(device).eval()
    prepare_path(path, classifier, args, device, compiled=False)
    return classifier_cond_fn(classifier, args.classifier_scale)


def run_steps(diffusion, model, x, ts, model_kwargs, guidance, cond_fn=None):
    """DDIM steps over the pre-built timestep tensors ``ts`` (host index, device tensor)."""
    for i, t in ts:
        if guidance is not None and hasattr(guidance, "step_hint"):
            guidance.step_hint = (t, i)
        x = diffusion.ddim_sample(model, x, t, model_kwargs=model_kwargs, guidance=guidance,
                                  cond_fn=cond_fn)["sample"]
    return x


def measure(layout, batch, path, args, device):
    """Seconds per plain step and per SAG step for one configuration."""
    model, diffusion, kwargs = build(layout, device)
    sag_cls = prepare_path(path, model, args, device)
    block, depth = LAYOUTS[layout][1]
    guidance = sag_cls(model, guide_scale=args.guide_scale, guide_start=10 ** 9,
                       blur_sigma=args.blur_sigma, sel_attn_block=block, sel_attn_depth=depth)
    size = kwargs["image_size"]
    gen = th.Generator(device="cpu").manual_seed(1)
    x = th.randn(batch, 3, size, size, generator=gen).to(device)
    model_kwargs = {"y": th.randint(0, 1000, (batch,), generator=gen).to(device)} if kwargs["class_cond"] else {}
    top = diffusion.num_timesteps - 1
    warm = [(i, th.full((batch,), i, device=device, dtype=th.long)) for i in range(top, top - args.warmup, -1)]
    timed = [(i, th.full((batch,), i, device=device, dtype=th.long)) for i in range(top, top - args.steps, -1)]
    runs = [("plain", model, model_kwargs, None, None), ("sag", model, model_kwargs, guidance, None)]
    if args.classifier_guidance:
        cond_fn = build_cond_fn(layout, path, args, device)
        labels = {"y": th.randint(0, 1000, (batch,), generator=gen).to(device)}
        unet = model if kwargs["class_cond"] else (lambda x_, t_, y=None: model(x_, t_))
        if path == "fast":  # gradient overlapping SAG's second pass, as classifier_sample.py
            runs.append(("sag_cg", unet, labels, guidance, ClassifierGradientOverlap(cond_fn)))
            runs.append(("sag_cg_seq", unet, labels, guidance, cond_fn))
        else:
            runs.append(("sag_cg", unet, labels, guidance, cond_fn))
    result = {}
    with th.no_grad():
        for name, net, net_kwargs, g, cond in runs:
            pair_overlap(g, cond)
            run_steps(diffusion, net, x, warm, net_kwargs, g, cond)
            if device.type == "cuda":
                th.cuda.synchronize()
                th.cuda.reset_peak_memory_stats()
            with Timer(device) as timer:
                run_steps(diffusion, net, x, timed, net_kwargs, g, cond)
            result[name] = timer.seconds / args.steps
            if device.type == "cuda":
                result[name + "_mem"] = th.cuda.max_memory_allocated() / 2 ** 30
    guidance.close()
    model = guidance = runs = None  # free the GPU memory before the next configuration
    gc.collect()
    if device.type == "cuda":
        th.cuda.empty_cache()
    set_tf32(False)
    return result


def table(rows, args, device):
    head = ("| layout | batch | path | plain ms/step | plain img/s | SAG ms/step | SAG img/s | "
            "SAG/plain | SAG speed-up vs fp16 | SAG TFLOP/s | SAG MFU | peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {(r["layout"], r["batch"]): r for r in rows if r["path"] == "fp16"}
    for r in rows:
        ref = base.get((r["layout"], r["batch"]))
        speed = f"{ref['sag'] / r['sag']:.2f}x" if ref else "-"
        tflops = 2 * r["flops"] * r["batch"] / r["sag"] / 1e12 if r["flops"] else 0.0
        mfu = f"{100 * tflops / args.peak_tflops:.2f}%" if r["flops"] else "-"
        mem = f"{r['sag_mem']:.1f}" if "sag_mem" in r else "-"
        lines.append(
            f"| {r['layout']} | {r['batch']} | {r['label']} | {1e3 * r['plain']:.1f} | "
            f"{r['batch'] / r['plain']:.2f} | {1e3 * r['sag']:.1f} | {r['batch'] / r['sag']:.2f} | "
            f"{r['sag'] / r['plain']:.2f} | {speed} | {tflops:.3g} | {mfu} | {mem} |")
    notes = [
        f"Machine: {describe_machine(device)}. {args.steps} timed DDIM steps after {args.warmup} warm-up steps; "
        "img/s = images per second per sampler step (divide by the step count for whole samples).",
        "SAG TFLOP/s = 2 UNet forwards x counted FLOPs x batch / SAG step time; MFU against "
        f"--peak_tflops {args.peak_tflops:g}. " + "; ".join(
            f"counted FLOPs/image/forward {lay}: {f / 1e12:.4g} TFLOP"
            + (f" (reference figure {LAYOUTS[lay][2]} TFLOP)" if LAYOUTS[lay][2] else "")
            for lay, f in sorted({(r["layout"], r["flops"]) for r in rows})),
    ]
    if any("sag_cg" in r for r in rows):
        head = ("| layout | batch | path | SAG+CG ms/step | SAG+CG img/s | SAG+CG / SAG | "
                "SAG+CG speed-up vs fp16 | overlap gain (sequential / overlapped) |")
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            ref = base.get((r["layout"], r["batch"]))
            speed = f"{ref['sag_cg'] / r['sag_cg']:.2f}x" if ref else "-"
            gain = f"{r['sag_cg_seq'] / r['sag_cg']:.2f}x" if "sag_cg_seq" in r else "-"
            lines.append(
                f"| {r['layout']} | {r['batch']} | {r['label']} | {1e3 * r['sag_cg']:.1f} | "
                f"{r['batch'] / r['sag_cg']:.2f} | {r['sag_cg'] / r['sag']:.2f} | {speed} | {gain} |")
        notes.append("SAG+CG = one SAG step plus the classifier gradient (classifier_defaults() layout "
                     "at the model's size, random weights); the fast path overlaps the gradient with "
                     "SAG's second pass on a side CUDA stream (sequential on CPU).")
    return "\n".join(lines), notes


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        th.set_num_threads(args.threads)
    device = pick_device(args.device)
    fast_label = "fast ({}{}{}{})".format(
        args.dtype, ", compile" if (args.compile if args.compile is not None else device.type == "cuda") else "",
        ", NHWC" if (args.channels_last if args.channels_last is not None else device.type == "cuda") else "",
        ", cudagraphs" if args.cuda_graphs else "")
    labels = {"exact": "exact fp32", "fp16": "orig-style fp16", "fast": fast_label}
    rows = []
    for layout in args.layouts.split(","):
        flops = counted_flops(layout)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for path in args.paths.split(","):
                t0 = time.perf_counter()
                res = measure(layout, batch, path, args, device)
                rows.append(dict(res, layout=layout, batch=batch, path=path, label=labels[path], flops=flops))
                print(f"[{layout} b{batch} {labels[path]}] plain {1e3 * res['plain']:.1f} ms/step, "
                      f"SAG {1e3 * res['sag']:.1f} ms/step ({time.perf_counter() - t0:.1f} s)", flush=True)
    text, notes = table(rows, args, device)
    print()
    print("\n".join(notes))
    print(text)
    if args.out:
        command = "python scripts/benchmark_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_markdown(args.out, "Run", command, notes, text, " (CPU smoke test)" if args.tiny else "")


if __name__ == "__main__":
    main()
