"""Benchmark plain, SAG, PAG and SEG DDIM sampling steps: exact fp32, original-style fp16, fast path.

Random weights in the published 128 / 256 layouts (timings need no trained weights). For every
(layout, batch size, path): ``warmup`` untimed steps, then ``steps`` timed sampler steps, plain
and with each guidance of ``--guidances`` (SAG: two UNet passes + mask + blur per step; PAG /
SEG: two passes, the second with perturbed attention blocks). GPU: CUDA-event timing; CPU:
perf_counter. FLOPs per image and forward are counted with ``torch.utils.flop_counter`` on the
meta device. The tables are printed last; ratios are measured in this run, never asserted.

On the fast path the PAG / SEG table also measures, in the same run: the fast perturbed ops
against the exact ones on the same (SDPA) model, the cost of PAG's kept random draws
(``reproduce_rng``), and the UNet work of a guided step as two passes of B against one pass of
2B with only the second half perturbed.

    python scripts/benchmark_sampling.py                      # 128 and 256, batch 16 and 64
    python scripts/benchmark_sampling.py --layouts 256 --batch_sizes 64 --out docs/benchmarks.md
    python scripts/benchmark_sampling.py --tiny               # CPU smoke test (< 1 min)
    python scripts/benchmark_sampling.py --layouts 128 --batch_sizes 16 --classifier_guidance True
    python scripts/benchmark_sampling.py --layouts 256 --batch_sizes 16 --guidances pag,seg

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
from guided_diffusion.fast_attention import op_layout  # noqa: E402
from guided_diffusion.fast_path import (  # noqa: E402
    ClassifierGradientOverlap,
    FastPerturbedAttention,
    FastPerturbedAttentionGuidance,
    FastSelfAttentionGuidance,
    pair_overlap,
    prepare_model,
    set_tf32,
)
from guided_diffusion.pag import (  # noqa: E402
    PAG,
    PAG_DEFAULT_LAYERS,
    SEG,
    SEG_DEFAULT_LAYERS,
    PerturbedAttentionGuidance,
    perturbed_attention,
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

# Model flags of the published command lines (README, "Sampling with OpenAI's checkpoints"); SAG block as in the README.
COMMON = dict(attention_resolutions="32,16,8", diffusion_steps=1000, learn_sigma=True,
              noise_schedule="linear", num_channels=256, num_res_blocks=2, resblock_updown=True,
              use_scale_shift_norm=True)
LAYOUTS = {
    "128": (dict(COMMON, image_size=128, class_cond=True, num_heads=4), ("output", 8), 0.61),
    "256": (dict(COMMON, image_size=256, class_cond=False, num_head_channels=64), ("output", 2), 2.24),
    "tiny": (dict(image_size=32, num_channels=32, channel_mult="1,1,1", attention_resolutions="32,16,8",
                  num_heads=4, num_res_blocks=1, learn_sigma=True, class_cond=True), ("output", 2), None),
    # the bundled default (configs/digits.sh): a CPU-sized model with trained weights elsewhere
    "digits": (dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,1,2",
                    attention_resolutions="16,8", num_heads=4, class_cond=True, num_classes=10,
                    learn_sigma=True, noise_schedule="cosine", use_scale_shift_norm=True),
               ("output", 2), None),
}
PATHS = ("exact", "fp16", "fast")
GUIDANCES = ("sag", "pag", "seg")
# PAG's blocks per layout: the published ImageNet-256 ones (16x16, 8x8, 8x8, 8x8) and the
# same grids in the other layouts; SEG: the middle block (its official "mid" default), on the
# digits model the PAG blocks (as configs/digits.sh: the middle block alone barely acts there).
PAG_LAYERS = {
    "128": ("input_blocks.11.1", "input_blocks.13.1", "input_blocks.14.1", "middle_block.1"),
    "256": PAG_DEFAULT_LAYERS,
    "tiny": ("input_blocks.3.1", "input_blocks.5.1", "middle_block.1"),
    "digits": ("input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1"),
}
SEG_LAYERS = dict({layout: SEG_DEFAULT_LAYERS for layout in LAYOUTS}, digits=PAG_LAYERS["digits"])
PAG_SCALE = 4.0  # the published PAG scale (paper 3), also SEG's official default
# Classifier flags for --classifier_guidance: OpenAI's published classifiers (128/256) are
# classifier_defaults() at the model's image size; the tiny one is as small as the tiny UNet.
CLASSIFIERS = {
    "128": dict(image_size=128),
    "256": dict(image_size=256),
    "tiny": dict(image_size=32, classifier_width=32, classifier_depth=1,
                 classifier_attention_resolutions="16,8"),
    "digits": dict(image_size=32, classifier_width=32, classifier_depth=2,
                   classifier_attention_resolutions="16,8", classifier_pool="attention", num_classes=10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="128,256", help="comma list of 128, 256, tiny, digits")
    p.add_argument("--batch_sizes", default="16,64")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of exact, fp16, fast")
    p.add_argument("--guidances", default=",".join(GUIDANCES), help="comma list of sag, pag, seg")
    p.add_argument("--steps", type=int, default=20, help="timed sampler steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (plain and SAG) first")
    p.add_argument("--rounds", type=int, default=5,
                   help="the timed steps of all runs are interleaved in this many rounds (load changes "
                   "on a shared machine then affect every run alike)")
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
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    unknown = [g for g in args.guidances.split(",") if g not in GUIDANCES]
    if unknown or not args.guidances:
        p.error(f"--guidances {args.guidances}: a comma list of {', '.join(GUIDANCES)}")
    if args.classifier_guidance and "sag" not in args.guidances.split(","):
        p.error("--classifier_guidance True times SAG + classifier guidance: keep sag in --guidances")
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
    """Turn a fresh fp32 network into the path's network; returns the SAG guidance class.

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


def perturbed_guidance(cls, model, layout, name, **overrides):
    """A PAG or SEG guidance (``cls``: exact or fast) on every step, at the published scale."""
    strategy, layers = (PAG, PAG_LAYERS[layout]) if name == "pag" else (SEG, SEG_LAYERS[layout])
    return cls(model, guide_scale=PAG_SCALE, drop_layers=layers, strategy=strategy, **overrides)


def measure(layout, batch, path, args, device):
    """Seconds per step of each run: plain, each guidance, and on the fast path the PAG / SEG
    variants (exact ops, no draws) and the two-passes-vs-one-batch figures."""
    model, diffusion, kwargs = build(layout, device)
    sag_cls = prepare_path(path, model, args, device)
    pag_cls = FastPerturbedAttentionGuidance if path == "fast" else PerturbedAttentionGuidance
    guidances = args.guidances.split(",")
    block, depth = LAYOUTS[layout][1]

    def sag():
        return sag_cls(model, guide_scale=args.guide_scale, guide_start=10 ** 9, blur_sigma=args.blur_sigma,
                       sel_attn_block=block, sel_attn_depth=depth)

    size = kwargs["image_size"]
    gen = th.Generator(device="cpu").manual_seed(1)
    x = th.randn(batch, 3, size, size, generator=gen).to(device)
    classes = kwargs["num_classes"]
    model_kwargs = {"y": th.randint(0, classes, (batch,), generator=gen).to(device)} if kwargs["class_cond"] else {}
    top = diffusion.num_timesteps - 1
    warm = [(i, th.full((batch,), i, device=device, dtype=th.long)) for i in range(top, top - args.warmup, -1)]
    timed = [(i, th.full((batch,), i, device=device, dtype=th.long)) for i in range(top, top - args.steps, -1)]
    # (name, network, its kwargs, guidance factory, cond_fn); each guidance lives for its run only
    runs = [("plain", model, model_kwargs, None, None)]
    if "sag" in guidances:
        runs.append(("sag", model, model_kwargs, sag, None))
    for name in ("pag", "seg"):
        if name in guidances:
            runs.append((name, model, model_kwargs, lambda n=name: perturbed_guidance(pag_cls, model, layout, n), None))
            if path == "fast":  # the same SDPA model with the exact perturbed ops
                runs.append((f"{name}_exact_ops", model, model_kwargs,
                             lambda n=name: perturbed_guidance(PerturbedAttentionGuidance, model, layout, n), None))
    if "pag" in guidances and path == "fast":  # without the original's (unused) mask draws
        runs.append(("pag_no_draws", model, model_kwargs,
                     lambda: perturbed_guidance(pag_cls, model, layout, "pag", reproduce_rng=False), None))
    if args.classifier_guidance:
        cond_fn = build_cond_fn(layout, path, args, device)
        labels = {"y": th.randint(0, classes, (batch,), generator=gen).to(device)}
        unet = model if kwargs["class_cond"] else (lambda x_, t_, y=None: model(x_, t_))
        if path == "fast":  # gradient overlapping SAG's second pass, as classifier_sample.py
            runs.append(("sag_cg", unet, labels, sag, ClassifierGradientOverlap(cond_fn)))
            runs.append(("sag_cg_seq", unet, labels, sag, cond_fn))
        else:
            runs.append(("sag_cg", unet, labels, sag, cond_fn))
    result = {}
    rounds = [timed[k::args.rounds] for k in range(min(args.rounds, len(timed)))]
    with th.no_grad():
        # Every run's guidance lives through all rounds; each round times a share of every run's
        # steps in turn, so a change of machine load falls on all runs alike.
        built = [(name, net, net_kwargs, make_guidance() if make_guidance else None, cond)
                 for name, net, net_kwargs, make_guidance, cond in runs]
        for name, net, net_kwargs, g, cond in built:
            pair_overlap(g, cond)
            run_steps(diffusion, net, x, warm, net_kwargs, g, cond)
            result[name] = 0.0
        for steps in rounds:
            for name, net, net_kwargs, g, cond in built:
                if device.type == "cuda":
                    th.cuda.synchronize()
                    th.cuda.reset_peak_memory_stats()
                with Timer(device) as timer:
                    run_steps(diffusion, net, x, steps, net_kwargs, g, cond)
                result[name] += timer.seconds / args.steps
                if device.type == "cuda":
                    peak = th.cuda.max_memory_allocated() / 2 ** 30
                    result[name + "_mem"] = max(peak, result.get(name + "_mem", 0.0))
        for _, _, _, g, _ in built:
            if g is not None:
                g.close()
        if "pag" in guidances and path == "fast":
            result.update(pass_pair_seconds(model, layout, x, timed[0][1], model_kwargs, args, device))
    model = runs = built = None  # free the GPU memory before the next configuration
    gc.collect()
    if device.type == "cuda":
        th.cuda.empty_cache()
    set_tf32(False)
    return result


def pass_pair_seconds(model, layout, x, t, model_kwargs, args, device):
    """The UNet work of a PAG step, two ways: a plain and a perturbed pass of B (as the sampler
    runs them), and one pass of 2B perturbing only its second half. Seconds per step each,
    alternating the two so that both see the same machine load."""
    layers = PAG_LAYERS[layout]
    ops = {}

    def ops_perturbing_from(start):
        def make_op(name, original):
            if (name, start) not in ops:
                ops[name, start] = FastPerturbedAttention(
                    original.n_heads, op_layout(original) == "new", PAG, perturb_from=start)
            return ops[name, start]
        return make_op

    batch = x.shape[0]
    doubled = {key: th.cat([value, value]) for key, value in model_kwargs.items()}
    x2, t2 = th.cat([x, x]), th.cat([t, t])

    def two_passes():
        model(x, t, **model_kwargs)
        with perturbed_attention(model, layers, PAG, make_op=ops_perturbing_from(0)):
            model(x, t, **model_kwargs)

    def one_batch():
        with perturbed_attention(model, layers, PAG, make_op=ops_perturbing_from(batch)):
            model(x2, t2, **doubled)

    seconds = {"pag_two_passes": 0.0, "pag_one_batch": 0.0}
    for _ in range(args.warmup):
        two_passes()
        one_batch()
    for _ in range(args.steps):  # alternating, step by step
        for name, run in (("pag_two_passes", two_passes), ("pag_one_batch", one_batch)):
            with Timer(device) as timer:
                run()
            seconds[name] += timer.seconds / args.steps
    return seconds


def table(rows, args, device):
    """The markdown tables (SAG, SAG + CG, PAG / SEG, PAG / SEG fast-path figures) and notes."""
    base = {(r["layout"], r["batch"]): r for r in rows if r["path"] == "fp16"}
    exact = {(r["layout"], r["batch"]): r for r in rows if r["path"] == "exact"}
    lines = []
    notes = [
        f"Machine: {describe_machine(device)}. {args.steps} timed DDIM steps after {args.warmup} warm-up steps, "
        f"the runs of a configuration interleaved in {min(args.rounds, args.steps)} rounds; img/s = images per "
        "second per sampler step (divide by the step count for whole samples).",
    ]
    if any("sag" in r for r in rows):
        lines += table_lines("| layout | batch | path | plain ms/step | plain img/s | SAG ms/step | SAG img/s | "
                             "SAG/plain | SAG speed-up vs fp16 | SAG TFLOP/s | SAG MFU | peak GiB |")
        for r in rows:
            tflops = 2 * r["flops"] * r["batch"] / r["sag"] / 1e12 if r["flops"] else 0.0
            mfu = f"{100 * tflops / args.peak_tflops:.2f}%" if r["flops"] else "-"
            mem = f"{r['sag_mem']:.1f}" if "sag_mem" in r else "-"
            lines.append(
                f"| {r['layout']} | {r['batch']} | {r['label']} | {1e3 * r['plain']:.1f} | "
                f"{r['batch'] / r['plain']:.2f} | {1e3 * r['sag']:.1f} | {r['batch'] / r['sag']:.2f} | "
                f"{r['sag'] / r['plain']:.2f} | {speed_up(base, r, 'sag')} | {tflops:.3g} | {mfu} | {mem} |")
        notes.append(
            "SAG TFLOP/s = 2 UNet forwards x counted FLOPs x batch / SAG step time; MFU against "
            f"--peak_tflops {args.peak_tflops:g}. " + "; ".join(
                f"counted FLOPs/image/forward {lay}: {f / 1e12:.4g} TFLOP"
                + (f" (reference figure {LAYOUTS[lay][2]} TFLOP)" if LAYOUTS[lay][2] else "")
                for lay, f in sorted({(r["layout"], r["flops"]) for r in rows})))
    if any("sag_cg" in r for r in rows):
        lines += [""] + table_lines("| layout | batch | path | SAG+CG ms/step | SAG+CG img/s | SAG+CG / SAG | "
                                    "SAG+CG speed-up vs fp16 | overlap gain (sequential / overlapped) |")
        for r in rows:
            gain = f"{r['sag_cg_seq'] / r['sag_cg']:.2f}x" if "sag_cg_seq" in r else "-"
            lines.append(
                f"| {r['layout']} | {r['batch']} | {r['label']} | {1e3 * r['sag_cg']:.1f} | "
                f"{r['batch'] / r['sag_cg']:.2f} | {r['sag_cg'] / r['sag']:.2f} | "
                f"{speed_up(base, r, 'sag_cg')} | {gain} |")
        notes.append("SAG+CG = one SAG step plus the classifier gradient (classifier_defaults() layout "
                     "at the model's size, random weights); the fast path overlaps the gradient with "
                     "SAG's second pass on a side CUDA stream (sequential on CPU).")
    perturbed = [name for name in ("pag", "seg") if any(name in r for r in rows)]
    if perturbed:
        lines += [""] + table_lines("| layout | batch | path | plain ms/step | " + " | ".join(
            f"{n.upper()} ms/step | {n.upper()} img/s | {n.upper()}/plain | {n.upper()} speed-up vs fp16 | "
            f"{n.upper()} speed-up vs exact" for n in perturbed) + " |")
        for r in rows:
            cells = [f"{1e3 * r['plain']:.1f}"]
            for n in perturbed:
                cells += [f"{1e3 * r[n]:.1f}", f"{r['batch'] / r[n]:.2f}", f"{r[n] / r['plain']:.2f}",
                          speed_up(base, r, n), speed_up(exact, r, n)]
            lines.append(f"| {r['layout']} | {r['batch']} | {r['label']} | " + " | ".join(cells) + " |")
        notes.append(
            f"PAG / SEG: scale {PAG_SCALE:g} on every step, two UNet passes per step. PAG perturbs "
            + "; ".join(f"{lay}: {' '.join(PAG_LAYERS[lay])}" for lay in sorted({r['layout'] for r in rows}))
            + " (identity attention, noise_scale 1, the original's random draws kept); SEG sigma inf on "
            + "; ".join(f"{lay}: {' '.join(SEG_LAYERS[lay])}" for lay in sorted({r['layout'] for r in rows})) + ".")
    fast = [r for r in rows if any(key.endswith("_exact_ops") for key in r)]
    if fast:
        lines += [""] + table_lines("| layout | batch | path | PAG: exact ops / fast ops | SEG: exact ops / fast ops | "
                                    "PAG: with draws / without | PAG UNet work: two passes of B / one pass of 2B |")
        for r in fast:
            cells = [ratio(r, "pag_exact_ops", "pag"), ratio(r, "seg_exact_ops", "seg"),
                     ratio(r, "pag", "pag_no_draws"), ratio(r, "pag_two_passes", "pag_one_batch")]
            lines.append(f"| {r['layout']} | {r['batch']} | {r['label']} | " + " | ".join(cells) + " |")
        notes.append(
            "Fast path only, same model: 'exact ops / fast ops' = step time with the exact perturbed "
            "ops (PAG: masked T x T softmax; SEG: full map of the mean query) over the fast ones "
            "(PAG: v itself; SEG: one query row per head); 'with draws / without' = the cost of "
            "reproducing the original's th.rand masks (reproduce_rng); the last column times the "
            "UNet forwards of a PAG step (plain + perturbed pass of B, as sampled) against one pass "
            "of [x; x] perturbing only the second half (> 1: the single batch would pay).")
    return "\n".join(lines), notes


def table_lines(head):
    return [head, "|" + "---|" * (head.count("|") - 1)]


def speed_up(reference_rows, r, key):
    """``reference / r`` for ``key`` against the reference path's row of the same layout and batch."""
    ref = reference_rows.get((r["layout"], r["batch"]))
    return f"{ref[key] / r[key]:.2f}x" if ref and key in ref and key in r else "-"


def ratio(r, numerator, denominator):
    return f"{r[numerator] / r[denominator]:.2f}x" if numerator in r and denominator in r else "-"


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
                timings = ", ".join(f"{name} {1e3 * res[name]:.1f}" for name in ("plain", *GUIDANCES) if name in res)
                print(f"[{layout} b{batch} {labels[path]}] ms/step: {timings} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    text, notes = table(rows, args, device)
    print()
    print("\n".join(notes))
    print(text)
    if args.out:
        command = "python scripts/benchmark_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_markdown(args.out, "Run", command, notes, text, " (CPU smoke test)" if args.tiny else "")


if __name__ == "__main__":
    main()
