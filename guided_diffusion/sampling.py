"""The sampling driver behind scripts/image_sample.py and scripts/classifier_sample.py.

Work is split into global batches.  Batch ``b`` is sampled from the seed ``batch_seed(seed, b)``
(labels, then initial noise, then the sampler's own draws), so the output does not depend on the
number of ranks.  Each finished batch is written by its rank to ``shards/batch_{b:06d}.npz``
atomically; a re-run with the same arguments and ``--output_dir`` only makes the missing batches.
Rank 0 then streams the shards, in global order, into ``samples_{N}x{H}x{W}x3.npz``.
"""

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch as th
import torch.nn.functional as F

from . import dist_util, pag_flags
from .checkpoint_util import CheckpointError, load_checkpoint
from .fast_path import (
    ClassifierGradientOverlap,
    fast_path_defaults,
    fast_path_flags,
    pair_overlap,
    prepare_model,
    sag_class,
)
from .image_io import make_grid, to_uint8_nhwc, write_npz_stream, write_png

# Arguments that change nothing in the samples; a resumed run may use other values.
HARMLESS_ARGS = ("output_dir", "progress", "step_progress", "save_grid") + pag_flags.HARMLESS_ARGS
RUN_FILE = "args.json"
SHARD_DIR = "shards"


class UsageError(Exception):
    """A user-facing problem reported as one line on stderr (no traceback)."""


# ----------------------------------------------------------------------------- flags


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
        f"of the original {script}; the output is a resumable, MPI-sharded run directory.",
    )
    su.add_dict_to_argparser(parser, defaults)
    speed = parser.add_argument_group(
        "speed (GPU fast path; defaults keep the exact float32 path, see docs/benchmarks.md)")
    su.add_dict_to_argparser(speed, fast_path_defaults())
    pag_flags.add_arguments(parser)  # PAG / SEG flags (guided_diffusion/pag_flags.py)
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


# ----------------------------------------------------------------------------- seeds


def batch_seed(seed, batch):
    """Seed of global batch ``batch``: splitmix64 of ``seed * 2**32 + batch``, as a 63-bit int.

    Plain integer arithmetic (no ``hash``), identical on every rank, process and machine.
    """
    mask = (1 << 64) - 1
    z = ((seed << 32) + batch + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


def random_seed():
    return int.from_bytes(os.urandom(4), "little") >> 1


# ----------------------------------------------------------------------------- run directory


def default_output_dir():
    """``RESULTS/<UTC %Y_%m_%d-%I%M%S_%p>``, as the original scripts name their runs."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y_%m_%d-%I%M%S_%p")
    return os.path.join("RESULTS", stamp)


def npz_name(args):
    return f"samples_{args.num_samples}x{args.image_size}x{args.image_size}x3.npz"


def shard_path(out_dir, batch):
    return os.path.join(out_dir, SHARD_DIR, f"batch_{batch:06d}.npz")


def finished_shards(out_dir, num_batches):
    """Global indices of the batches whose shard file exists (shards appear atomically)."""
    return [b for b in range(num_batches) if os.path.exists(shard_path(out_dir, b))]


def _identity(record, ignore_seed):
    ignored = set(HARMLESS_ARGS) | ({"seed"} if ignore_seed else set())
    return {k: v for k, v in record["args"].items() if k not in ignored}, record.get("script")


def inspect_run_dir(args, kind):
    """Check ``args.output_dir`` without writing anything; resolve the seed.

    Returns ``(seed, finished)``.  Raises UsageError when the directory holds another run's
    samples or arguments.
    """
    out_dir = args.output_dir
    run_file = os.path.join(out_dir, RUN_FILE)
    seed = args.seed
    if not os.path.exists(run_file):
        leftovers = glob.glob(os.path.join(out_dir, "samples_*.npz")) + glob.glob(
            os.path.join(out_dir, SHARD_DIR, "batch_*.npz"))
        if leftovers:
            raise UsageError(f"output dir {out_dir} holds samples of an unknown run (no {RUN_FILE}); "
                             "choose another --output_dir")
        return (random_seed() if seed is None else seed), False
    try:
        with open(run_file) as f:
            stored = json.load(f)
        stored_args = stored["args"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read {run_file}: {exc}; choose another --output_dir")
    mine = {"script": kind, "args": dict(vars(args), seed=seed)}
    if _identity(mine, seed is None) != _identity(stored, seed is None):
        mine_id, theirs_id = _identity(mine, seed is None)[0], _identity(stored, seed is None)[0]
        diff = sorted(k for k in set(mine_id) | set(theirs_id) if mine_id.get(k) != theirs_id.get(k))
        what = ", ".join(f"--{k} {theirs_id.get(k)!r} there vs {mine_id.get(k)!r} now" for k in diff[:3])
        if stored.get("script") != kind:
            what = f"it was made by {stored.get('script')}_sample.py" + (f"; {what}" if what else "")
        raise UsageError(f"output dir {out_dir} holds a run with other arguments ({what}); "
                         "use the same arguments to resume or choose another --output_dir")
    seed = stored_args.get("seed") if seed is None else seed
    return seed, os.path.exists(os.path.join(out_dir, npz_name(args)))


def write_run_files(args, kind):
    """Record the run's arguments (args.json; config.yaml like the original) if not yet there."""
    run_file = os.path.join(args.output_dir, RUN_FILE)
    if not os.path.exists(run_file):
        _atomic_write(run_file, json.dumps({"script": kind, "args": vars(args)}, indent=2, sort_keys=True))
    yaml_file = os.path.join(args.output_dir, "config.yaml")
    if not os.path.exists(yaml_file):
        import yaml

        _atomic_write(yaml_file, yaml.dump(vars(args)))


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- models


def _factory_args(args, keys):
    return {k: getattr(args, k) for k in keys}


# Building on the meta device skips random initialisation (seconds for the 128-512 models) but
# its first use imports torch's compiler stack (~2 s): it pays only for large checkpoints.
META_BUILD_MIN_BYTES = 64 << 20


def _load_network(build, path, what, use_fp16):
    """Build a network (on the meta device for large checkpoints), strictly load ``path``, move it
    to the device, convert to fp16 if asked and switch to eval mode."""
    large = os.path.isfile(path) and os.path.getsize(path) >= META_BUILD_MIN_BYTES
    with th.device("meta") if large else contextlib.nullcontext():
        net = build()
    load_checkpoint(net, path, what, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        net = build()  # some tensor lives outside the state dict: build it for real
        load_checkpoint(net, path, what)
    net = net.float().to(dist_util.dev())
    if use_fp16:
        net.convert_to_fp16()
    return net.eval()


def classifier_cond_fn(classifier, scale):
    """Classifier guidance's ``cond_fn``: ``scale`` * grad_x log p(y | x_t) (OpenAI's)."""

    def cond_fn(x, t, y=None):
        assert y is not None
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def build_sampler(args, kind):
    """Everything a batch needs: ``(diffusion, model_fn, cond_fn, guidance)``."""
    from . import script_util as su

    model_keys = su.model_and_diffusion_defaults().keys()
    model_box = {}

    def build_model():
        try:
            model_box["model"], model_box["diffusion"] = su.create_model_and_diffusion(
                **_factory_args(args, model_keys))
        except (ValueError, AssertionError) as exc:  # e.g. --timestep_respacing, --image_size
            raise UsageError(f"invalid model/diffusion flags: {exc}")
        return model_box["model"]

    model = _load_network(build_model, args.model_path, "model", args.use_fp16)
    fast = fast_path_flags(args)
    model = prepare_model(model, **fast)
    diffusion = model_box["diffusion"]
    try:
        guidance = pag_flags.build_guidance(args, model, fast) or sag_class(**fast)(
            model, guide_scale=args.guide_scale, guide_start=args.guide_start,
            blur_sigma=args.blur_sigma, sel_attn_block=args.sel_attn_block,
            sel_attn_depth=args.sel_attn_depth, sag_heads=args.sag_heads)
    except ValueError as exc:
        raise UsageError(str(exc).strip().splitlines()[0])
    if kind == "image":
        return diffusion, model, None, guidance

    def model_fn(x, t, y=None):
        assert y is not None
        return model(x, t, y if args.class_cond else None)

    if not args.classifier_guidance:  # the classifier is loaded only when it is used
        return diffusion, model_fn, None, guidance
    classifier = _load_network(
        lambda: su.create_classifier(**_factory_args(args, su.classifier_defaults().keys())),
        args.classifier_path, "classifier", args.classifier_use_fp16)
    # The classifier shares the UNet's attention kernels, autocast and memory layout (it is
    # differentiated every step, so it is not compiled).
    classifier = prepare_model(classifier, **dict(fast, compile=False, cuda_graphs=False))
    cond_fn = classifier_cond_fn(classifier, args.classifier_scale)
    if fast["fast_attention"]:  # on CUDA: classifier gradient concurrent with SAG's second pass
        cond_fn = ClassifierGradientOverlap(cond_fn)
        pair_overlap(guidance, cond_fn)
    return diffusion, model_fn, cond_fn, guidance


def sample_batch(args, sampler, batch, draws_labels):
    """Sample global batch ``batch``: labels, then initial noise, then the loop, all from
    ``batch_seed(args.seed, batch)``.  Returns uint8 NHWC images and int64 labels (or None)."""
    diffusion, model_fn, cond_fn, guidance = sampler
    device = dist_util.dev()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    th.manual_seed(batch_seed(args.seed, batch))
    model_kwargs, labels = {}, None
    if draws_labels:
        classes = th.randint(0, args.num_classes, (args.batch_size,), device=device)
        model_kwargs["y"] = classes
        labels = classes.cpu().numpy().astype(np.int64)
    noise = th.randn(*shape, device=device)
    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    sample = loop(model_fn, shape, noise=noise, clip_denoised=args.clip_denoised,
                  model_kwargs=model_kwargs, cond_fn=cond_fn, device=device,
                  progress=args.step_progress and dist_util.get_rank() == 0, guidance=guidance)
    return to_uint8_nhwc(sample), labels


# ----------------------------------------------------------------------------- shards


def write_shard(out_dir, batch, images, labels):
    """Write one finished batch atomically (temp file + os.replace)."""
    path = shard_path(out_dir, batch)
    tmp = f"{path[:-4]}.tmp{os.getpid()}.npz"
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def merge_shards(args, num_batches, with_labels):
    """Stream the shards, in global order, into the final npz (exactly num_samples images)."""
    out_dir, n, size = args.output_dir, args.num_samples, args.image_size

    def chunks(key):
        left = n
        for b in range(num_batches):
            with np.load(shard_path(out_dir, b)) as shard:
                part = shard[key][:left]
            left -= len(part)
            yield part

    members = [("arr_0", np.uint8, (n, size, size, 3), chunks("arr_0"))]
    if with_labels:
        members.append(("arr_1", np.int64, (n,), chunks("arr_1")))
    path = os.path.join(out_dir, npz_name(args))
    write_npz_stream(path, members)
    return path


def save_grid(args, count):
    """samples_grid.png with the first ``count`` samples, read from the shards."""
    images, b = [], 0
    while sum(len(i) for i in images) < count and os.path.exists(shard_path(args.output_dir, b)):
        with np.load(shard_path(args.output_dir, b)) as shard:
            images.append(shard["arr_0"])
        b += 1
    grid = make_grid(np.concatenate(images)[:count])
    path = os.path.join(args.output_dir, "samples_grid.png")
    write_png(path, grid)
    return path


def remove_shards(out_dir, num_batches):
    for b in range(num_batches):
        os.remove(shard_path(out_dir, b))
    try:
        os.rmdir(os.path.join(out_dir, SHARD_DIR))
    except OSError:
        pass


def _remove_stale_temps(out_dir):
    for path in glob.glob(os.path.join(out_dir, SHARD_DIR, "batch_*.tmp*.npz")):
        os.remove(path)


# ----------------------------------------------------------------------------- driver


def _prepare(args, kind):
    """Rank 0: resolve output dir and seed (read-only). Returns a plan dict or an error string."""
    args.output_dir = args.output_dir or default_output_dir()
    try:
        seed, finished = inspect_run_dir(args, kind)
    except UsageError as exc:
        return str(exc)
    return dict(output_dir=args.output_dir, seed=seed, finished=finished)


def run(args, kind):
    """Sample ``args.num_samples`` images into ``args.output_dir`` (see module docstring)."""
    from . import logger

    validate_args(args)
    dist_util.setup_dist(cuda_index=pag_flags.cuda_index(args))  # --gpu / --gpu_offset
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    plan = dist_util.broadcast_object(_prepare(args, kind) if rank == 0 else None)
    if isinstance(plan, str):
        raise UsageError(plan)
    args.output_dir, args.seed = plan["output_dir"], plan["seed"]
    if plan["finished"]:
        if rank == 0:
            print(f"{os.path.join(args.output_dir, npz_name(args))} is already complete; nothing to do")
        return
    draws_labels = kind == "classifier" or args.class_cond
    sampler = build_sampler(args, kind)

    if rank == 0:
        os.makedirs(os.path.join(args.output_dir, SHARD_DIR), exist_ok=True)
        write_run_files(args, kind)
        _remove_stale_temps(args.output_dir)
    dist_util.barrier()
    bar_on = rank == 0 and args.progress
    # With a progress bar, log lines go to the files and above the bar (not through stdout).
    logger.configure(dir=args.output_dir, format_strs=["log", "csv"] if bar_on else None)
    note = _notifier(logger, bar_on)
    num_batches = -(-args.num_samples // args.batch_size)
    pending = dist_util.broadcast_object(
        [b for b in range(num_batches) if not os.path.exists(shard_path(args.output_dir, b))]
        if rank == 0 else None)
    note(f"{kind}_sample: {args.num_samples} samples in {num_batches} batches of "
               f"{args.batch_size}, seed {args.seed}, {world} rank(s), "
               f"{num_batches - len(pending)} batch(es) already done; output {args.output_dir}")
    if dist_util.dev().type == "cpu" and (args.use_fp16 or getattr(args, "classifier_use_fp16", False)):
        note("warning: fp16 weights on a CPU: half-precision convolutions are very slow on most CPUs "
             "(minutes per UNet pass at 128x128); pass --use_fp16 False (and --classifier_use_fp16 "
             "False) to sample in float32")

    bar = _progress_bar(args, num_batches - len(pending), rank)
    for b in pending[rank::world]:
        start = time.time()
        images, labels = sample_batch(args, sampler, b, draws_labels)
        pag_flags.after_batch(args, b, images, labels, sampler[3])  # --save_png, --visualize
        write_shard(args.output_dir, b, images, labels)
        note(f"batch {b} done in {time.time() - start:.1f}s")
        _update(bar, args, num_batches)
    if bar is not None:  # rank 0 keeps the bar moving until the other ranks are done
        while len(finished_shards(args.output_dir, num_batches)) < num_batches and world > 1:
            time.sleep(1.0)
            _update(bar, args, num_batches)
        bar.close()
    dist_util.barrier()

    if rank == 0:
        missing = sorted(set(range(num_batches)) - set(finished_shards(args.output_dir, num_batches)))
        if missing:
            raise UsageError(f"shards missing after sampling: {missing[:5]}; re-run to resume")
        if args.save_grid:
            note(f"wrote {save_grid(args, min(args.save_grid, args.num_samples))}")
        path = merge_shards(args, num_batches, draws_labels)
        remove_shards(args.output_dir, num_batches)
        note(f"saved {args.num_samples} samples to {path}")
    dist_util.barrier()


def _notifier(logger, bar_on):
    """``logger.log``, plus a ``tqdm.write`` to stdout when the progress bar owns the terminal."""
    if not bar_on:
        return logger.log

    def note(msg):
        from tqdm import tqdm

        logger.log(msg)
        tqdm.write(msg)

    return note


def _progress_bar(args, done_batches, rank):
    if rank != 0:
        return None
    from tqdm import tqdm

    done = min(done_batches * args.batch_size, args.num_samples)
    return tqdm(total=args.num_samples, initial=done, unit="img", disable=not args.progress,
                dynamic_ncols=True, desc="sampling")


def _update(bar, args, num_batches):
    if bar is None:
        return
    done = min(len(finished_shards(args.output_dir, num_batches)) * args.batch_size, args.num_samples)
    bar.update(done - bar.n)


def main(kind, argv=None):
    """Entry point of both scripts: one clear line on stderr and exit code 1 for user errors."""
    args = create_argparser(kind).parse_args(argv)
    try:
        run(args, kind)
    except (UsageError, CheckpointError) as exc:
        if dist_util.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
