"""The sampling driver behind scripts/image_sample.py and scripts/classifier_sample.py.

Work is split into global batches, sampled from per-batch seeds (sampler_setup.py), so the
output does not depend on the number of ranks or on the launcher (mpiexec, srun, torchrun).
Rank 0 checks the run directory (run_dir.py: identity, lock, verification) and tells every rank
which batches are missing; each rank samples its share and writes each finished batch as a
shard; rank 0 merges the shards into ``samples_{N}x{H}x{W}x3.npz``, verifies it and only then
removes the shards.  A re-run with the same arguments and ``--output_dir`` resumes.

The ranks agree through ``dist_util.broadcast_object`` and ``dist_util.barrier`` only: a user
error found by rank 0 is broadcast, so every rank stops with the same one line.
"""

import os
import signal
import sys
import time
import traceback

from . import dist_util, pag_flags, run_dir
from .checkpoint_util import CheckpointError
from .image_io import make_grid, write_png
from .run_dir import HARMLESS_ARGS, Layout, RunDirError  # noqa: F401  (re-exported)
from .sampler_choice import describe_sampler
from .sample_flags import UsageError, create_argparser, sample_defaults, validate_args  # noqa: F401
from .sampler_setup import (  # noqa: F401  (re-exported: scripts and tests import them from here)
    batch_seed,
    build_sampler,
    classifier_cond_fn,
    labels_drawn,
    random_seed,
    sample_batch,
)


def _inspect(args, kind):
    """Rank 0, reading only: resolve the output dir and the seed, refuse a directory held by
    another run early (before the model is loaded).  Returns the plan, or an error line."""
    args.output_dir = args.output_dir or run_dir.default_output_dir()
    try:
        stored_seed = run_dir.check_identity(args.output_dir, kind, vars(args))
        seed = args.seed if args.seed is not None else stored_seed
        layout = Layout.from_args(args, labels_drawn(args, kind))
        complete = run_dir.is_complete(layout)
        if not complete:
            run_dir.check_lock(args.output_dir, args.force_unlock)
    except RunDirError as exc:
        return str(exc)
    # No model for a run whose final file verifies and only needs its shards removed.
    needs_model = not complete and bool(layout.missing_batches()) and run_dir.verify_final(layout) is not None
    return dict(output_dir=args.output_dir, seed=random_seed() if seed is None else seed,
                complete=complete, needs_model=needs_model)


def _open(args, kind, layout):
    """Rank 0: lock the directory, record the run, clean up after killed writers and list the
    batches to sample.  Returns ``(start, lock)``; ``start`` is an error line on failure."""
    warnings = []
    try:
        lock = run_dir.acquire_lock(args.output_dir, args.force_unlock, warn=warnings.append)
    except RunDirError as exc:
        return str(exc), None
    try:
        run_dir.check_identity(args.output_dir, kind, vars(args))  # another run may have started it
        run_dir.write_identity(args.output_dir, kind, vars(args))
        pending = run_dir.open_run(layout, warn=warnings.append)
    except RunDirError as exc:
        lock.release()
        return str(exc), None
    return dict(pending=pending, warnings=warnings), lock


def _finish(args, layout, note):
    """Rank 0: merge, verify, remove the shards, draw the grid.  Returns None or an error line."""
    try:
        path = run_dir.finalize(layout)
    except RunDirError as exc:
        return str(exc)
    if args.save_grid:
        grid = run_dir.first_images(layout, min(args.save_grid, args.num_samples))
        grid_path = os.path.join(args.output_dir, "samples_grid.png")
        write_png(grid_path, make_grid(grid))
        note(f"wrote {grid_path}")
    note(f"saved {args.num_samples} samples to {path}")
    return None


def run(args, kind):
    """Sample ``args.num_samples`` images into ``args.output_dir`` (see module docstring)."""
    from . import logger

    validate_args(args)
    # --gpu / --gpu_offset (the PAG scripts' device flags) where the parser has them.
    dist_util.init_ranks(getattr(args, "gpu", None), getattr(args, "gpu_offset", None))
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    plan = dist_util.broadcast_object(_inspect(args, kind) if rank == 0 else None)
    if isinstance(plan, str):
        raise RunDirError(plan)
    args.output_dir, args.seed = plan["output_dir"], plan["seed"]
    layout = Layout.from_args(args, labels_drawn(args, kind))
    if plan["complete"]:
        if rank == 0:
            print(f"{layout.final_path} is already complete; nothing to do")
        return
    # Bad checkpoints and flags are reported before anything is written.
    sampler = build_sampler(args, kind) if plan["needs_model"] else None

    lock = None
    try:
        start = None
        if rank == 0:
            start, lock = _open(args, kind, layout)
        start = dist_util.broadcast_object(start)
        if isinstance(start, str):
            raise RunDirError(start)
        pending = start["pending"]
        if pending and sampler is None:
            sampler = build_sampler(args, kind)

        bar_on = rank == 0 and args.progress
        # With a progress bar, log lines go to the files and above the bar (not through stdout).
        logger.configure(dir=args.output_dir, format_strs=["log", "csv"] if bar_on else None)
        note = _notifier(logger, bar_on)
        for line in start["warnings"]:
            note(line)
        note(f"{kind}_sample: {args.num_samples} samples in {layout.num_batches} batches of "
             f"{args.batch_size}, seed {args.seed}, {world} rank(s) ({dist_util.launcher() or 'no launcher'}), "
             f"{layout.num_batches - len(pending)} batch(es) already done; output {args.output_dir}")
        note(describe_sampler(args))
        if dist_util.dev().type == "cpu" and (args.use_fp16 or getattr(args, "classifier_use_fp16", False)):
            note("warning: fp16 weights on a CPU: half-precision convolutions are very slow on most CPUs "
                 "(minutes per UNet pass at 128x128); pass --use_fp16 False (and --classifier_use_fp16 "
                 "False) to sample in float32")

        bar = _progress_bar(args, layout.num_batches - len(pending), rank)
        draws = labels_drawn(args, kind)
        for b in pending[rank::world]:
            tic = time.time()
            images, labels = sample_batch(args, sampler, b, draws)
            pag_flags.after_batch(args, b, images, labels, sampler[3])  # --save_png, --visualize
            run_dir.write_shard(layout, b, images, labels)
            note(f"batch {b} done in {time.time() - tic:.1f}s")
            _update(bar, args, layout)
        dist_util.barrier(tick=lambda: _update(bar, args, layout))  # rank 0's bar follows the others
        if bar is not None:
            _update(bar, args, layout)
            bar.close()

        error = dist_util.broadcast_object(_finish(args, layout, note) if rank == 0 else None)
        if error:
            raise RunDirError(error)
    finally:
        if lock is not None:
            lock.release()


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


def _update(bar, args, layout):
    if bar is None:
        return
    done = min(len(layout.finished_batches()) * args.batch_size, args.num_samples)
    bar.update(done - bar.n)


def _exit_on_sigterm():
    """Make SIGTERM (a scheduler's preemption or time limit, a launcher stopping its ranks) end
    the run like an exception, so the lock is released.  Returns the previous handler."""
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except ValueError:  # not the main thread
        return None


def main(kind, argv=None):
    """Entry point of both scripts: one clear line on stderr and exit code 1 for user errors; an
    unexpected failure of one rank stops the others (dist_util.abort)."""
    args = create_argparser(kind).parse_args(argv)
    previous = _exit_on_sigterm()
    try:
        run(args, kind)
    except (UsageError, RunDirError, CheckpointError) as exc:
        if dist_util.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as exc:
        if dist_util.get_world_size() > 1:
            traceback.print_exc()
            sys.stderr.flush()
            dist_util.abort(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
