"""OpenAI-compatible evaluator: IS / FID / sFID / precision / recall, PyTorch, MPI-sharded.

    python evaluations/evaluator.py REF_BATCH SAMPLE_BATCH [SAMPLE_BATCH ...] [options]
    mpiexec -n 4 python evaluations/evaluator.py REF.npz s1.npz s2.npz --report sweep.json

For every sample file it prints the original's five lines (``Inception Score:``, ``FID:``,
``sFID:``, ``Precision:``, ``Recall:``), then a summary table. See evaluations/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from evaluations import cache, metrics
from evaluations.dist import Comm
from evaluations.errors import EvalError
from evaluations.classifier_features import label_accuracy
from evaluations.features import available_extractors, build_extractor
from evaluations.frechet import CovarianceFactor
from evaluations.inception import PREPROCESSINGS, WEIGHTS_ENV
from evaluations.npz_io import NpzImages, read_stored_statistics
from evaluations.reference import Reference
from evaluations.report import format_table, write_report
from guided_diffusion.dist_util import mpi_unavailable_message


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref_batch")
    p.add_argument("sample_batch", nargs="+")
    p.add_argument("--features", default="inception", choices=available_extractors())
    p.add_argument("--inception_path", default=None,
                   help=f"pt_inception-2015-12-05-6726825d.pth (default: ${WEIGHTS_ENV}, "
                        "else ~/.cache/sag-adm/pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--preprocess", default="tf", choices=PREPROCESSINGS,
                   help="tf = OpenAI's graph (legacy resize, (x-128)/128); pytorch-fid = its defaults")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda (cuda:<rank %% gpus>) if available, else cpu")
    p.add_argument("--cache_dir", default=str(cache.DEFAULT_CACHE_DIR))
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the ref cache")
    p.add_argument("--report", default=None, help="write all results to out.json or out.csv")
    p.add_argument("--pr_fp32", action="store_true",
                   help="precision/recall distances in float32 (the original uses float16)")
    p.add_argument("--no_progress", action="store_true")
    group = p.add_argument_group(
        "classifier features (--features classifier)",
        "a noisy classifier at t=0 as the feature network: its penultimate features for "
        "FID/precision/recall plus the accuracy of the generated labels (arr_1); not comparable "
        "to Inception numbers")
    group.add_argument("--classifier_path", default="")
    from guided_diffusion.script_util import add_dict_to_argparser, classifier_defaults
    add_dict_to_argparser(group, classifier_defaults())
    return p.parse_args(argv)


def _device(arg, comm):
    if arg:
        return arg
    if torch.cuda.is_available():
        return f"cuda:{comm.rank % torch.cuda.device_count()}"
    return "cpu"


MIN_IMAGES = 4  # precision/recall use each point's 3rd nearest neighbour besides itself


def extract(images: NpzImages, extractor, comm, batch_size, desc, keys, progress=True):
    """Features of this rank's contiguous slice, read in one pass; rank 0 returns all of them,
    in order, after checking the file's checksum over the slices of all ranks."""
    start, stop = comm.shard(len(images))
    out = {k: [] for k in keys}
    bar = tqdm(total=stop - start, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=comm.rank != 0 or not progress)
    images.slice_checksum = None
    for batch in images.batches(batch_size, start, stop):
        feats = extractor(batch)
        for k in keys:
            out[k].append(feats[k].float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    pieces = comm.gather(images.slice_checksum)
    if comm.rank == 0:
        images.verify_slices(pieces)
    local = {k: np.concatenate(v, 0) for k, v in out.items()} if stop > start else {}
    return comm.gather_concat(local)


def statistics(path, feats, device, stored=None):
    """The original's read_statistics: stored mu/sigma/mu_s/sigma_s win over activations.
    ``stored``: what ``read_stored_statistics(path)`` returned, when already read."""
    stored = read_stored_statistics(path) if stored is None else stored
    if stored:
        return stored
    return (metrics.compute_statistics(feats["pool"], device),
            metrics.compute_statistics(feats["spatial"], device))


def open_inputs(args):
    """Every input file opened and checked before any work: (ref, samples, stored stats)."""
    ref = NpzImages(args.ref_batch)
    samples = [NpzImages(s) for s in args.sample_batch]
    for f in [ref] + samples:
        if len(f) < MIN_IMAGES:
            raise EvalError(f"{f.path}: {len(f)} images; precision/recall need at least "
                            f"{MIN_IMAGES} (each image's 3rd nearest neighbour)")
    for s in samples:
        if s.shape[1:3] != ref.shape[1:3]:
            raise EvalError(f"image size mismatch: {s.path} has {s.shape[1]}x{s.shape[2]}, "
                            f"reference {ref.path} has {ref.shape[1]}x{ref.shape[2]}")
    stored = {f.path: read_stored_statistics(f.path) or False for f in [ref] + samples}
    return ref, samples, stored


def reference(args, ref: NpzImages, stored, extractor, comm, device, say):
    """The reference batch (rank 0; None elsewhere), from the cache when possible, and the
    cache path to write it to at the end of a successful run (None: nothing to write)."""
    say("computing reference batch activations...")
    path, entry = None, None
    if comm.rank == 0 and not args.no_cache:
        path = cache.cache_path(args.cache_dir, ref, extractor.cache_key())
        arrays = cache.load(path)
        entry = Reference.from_arrays(arrays, device) if arrays is not None else None
    if comm.bcast(entry is not None):
        say("computing/reading reference batch statistics...")
        return entry, None
    feats = extract(ref, extractor, comm, args.batch_size, "reference", ("pool", "spatial"),
                    not args.no_progress)
    say("computing/reading reference batch statistics...")
    if comm.rank != 0:
        return None, None
    stats = statistics(ref.path, feats, device, stored[ref.path])
    return Reference.build(feats, stats, bool(stored[ref.path]), device), path


def evaluate_sample(args, s, stored, ref_entry: Reference, extractor, comm, device, say):
    """The original's five numbers for one sample file (rank 0; None elsewhere)."""
    say("computing sample batch activations...")
    feats = extract(s, extractor, comm, args.batch_size, "sample", ("pool", "spatial", "logits"),
                    not args.no_progress)
    say("computing/reading sample batch statistics...")
    if comm.rank != 0:
        return None
    (mu, sigma), (mu_s, sigma_s) = statistics(s.path, feats, device, stored[s.path])
    (rmu, rsigma), (rmu_s, rsigma_s) = ref_entry.stats
    say("Computing evaluations...")
    fp16, progress = not args.pr_fp32, not args.no_progress
    prec, rec = metrics.precision_recall(ref_entry.pool, feats["pool"], fp16=fp16, device=device,
                                         progress=progress,
                                         ref_radii=ref_entry.manifold_radii(fp16, device, progress))
    pool_factor, spatial_factor = ref_entry.factors
    own = [None if stored[s.path] else CovarianceFactor.thin(feats[k], sg, device)
           for k, sg in (("pool", sigma), ("spatial", sigma_s))]  # N <= D: exact and cheap
    row = {
        "sample": str(s.path),
        "num_samples": len(s),
        "inception_score": metrics.inception_score(feats["logits"], device=device),
        "fid": metrics.frechet_distance(mu, sigma, rmu, rsigma, ref_factor=pool_factor,
                                        sample_factor=own[0]),
        "sfid": metrics.frechet_distance(mu_s, sigma_s, rmu_s, rsigma_s, ref_factor=spatial_factor,
                                         sample_factor=own[1]),
        "precision": prec,
        "recall": rec,
    }
    for key, label in (("inception_score", "Inception Score:"), ("fid", "FID:"),
                       ("sfid", "sFID:"), ("precision", "Precision:"), ("recall", "Recall:")):
        print(label, row[key], flush=True)
    labels = s.labels()
    if args.features == "classifier" and labels is not None:
        row["accuracy"] = label_accuracy(feats["logits"], labels)
        print("Classifier accuracy:", row["accuracy"], flush=True)
    return row


def evaluate(args, comm):
    say = (lambda m: print(m, flush=True)) if comm.rank == 0 else (lambda m: None)
    if args.batch_size < 1:
        raise EvalError("--batch_size must be >= 1")
    if args.report and Path(args.report).suffix not in (".json", ".csv"):
        raise EvalError(f"--report must end in .json or .csv, got {args.report}")
    ref, samples, stored = open_inputs(args)
    device = args.device = _device(args.device, comm)
    extractor = build_extractor(args.features, args)
    if args.features != "inception":
        say(f"note: {args.features} features - these numbers are not comparable to Inception FID")

    ref_entry, cache_file = reference(args, ref, stored, extractor, comm, device, say)
    rows = []
    for s in samples:
        if len(samples) > 1:
            say(f"sample batch: {s.path}")
        row = evaluate_sample(args, s, stored, ref_entry, extractor, comm, device, say)
        if row is not None:
            rows.append(row)
    if comm.rank == 0:
        print()
        print(format_table(rows), flush=True)
        if args.report:
            meta = {"ref": str(ref.path), "features": args.features, "preprocess": args.preprocess,
                    "pr_distance": "fp32" if args.pr_fp32 else "fp16"}
            write_report(args.report, rows, meta)
            print(f"report written to {args.report}", file=sys.stderr)
        if cache_file is not None:  # only once every input has been read without error
            cache.save(cache_file, ref_entry.to_arrays())
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # keep float32 matmuls exact on GPU
    torch.backends.cudnn.allow_tf32 = False
    try:
        comm = Comm()
    except (ImportError, RuntimeError) as e:
        print(f"error: {mpi_unavailable_message(e)}", file=sys.stderr)
        return 2
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        evaluate(args, comm)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        if comm.size > 1:
            sys.stderr.flush()
            comm._c.Abort(2)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
