"""Benchmark (not a test) of the evaluator: every stage against the straightforward reference
implementation, measured in the same run; prints markdown tables with the ratios.

    python scripts/benchmark_evaluator.py reading   # 5k / 20k images of 256x256, stored + compressed
    python scripts/benchmark_evaluator.py e2e       # synthetic files -> read, Inception, stats, FID, P/R
    python scripts/benchmark_evaluator.py metrics   # 10k ref vs 50k sample features (2048-d)
    python scripts/benchmark_evaluator.py all --quick   # tiny smoke run of the three

reading   ours (one pass) vs the old reader (zip member reopened and sought per batch); the
          ratio time(20k) / time(5k) shows whether reading is linear. Files are written under
          --dir (default: a temporary folder, removed afterwards) and read from the page cache.
e2e       a sample and a reference file of synthetic images, the FID Inception with random
          weights (timing only): reading, extraction per image, statistics (vs numpy), FID and
          sFID cold and with the cached reference factor (vs scipy sqrtm as OpenAI calls it),
          precision/recall (vs the full float16 emulation and plain numpy float32).
metrics   the same metrics on random features at the scale of real jobs.
"""
import argparse
import os
import resource
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluations import manifold, metrics  # noqa: E402
from evaluations.frechet import CovarianceFactor  # noqa: E402
from evaluations.npz_io import NpzImages  # noqa: E402
from guided_diffusion.bench_report import describe_machine  # noqa: E402


# ------------------------------------------------------------------ references


def openai_fid(mu1, sigma1, mu2, sigma2):
    """The original: scipy sqrtm of sigma1 @ sigma2, 1e-6 retry, real part."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def numpy_statistics(acts):
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def numpy_fp32_pr(ref, sample, k=3, block=10000):
    """Plain numpy float32 precision/recall (row blocks, so 50k x 50k fits in memory)."""
    def d2(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)

    def radii(x):
        out = []
        for i in range(0, len(x), block):
            best = None
            for j in range(0, len(x), block):
                d = d2(x[i : i + block], x[j : j + block])
                best = d if best is None else np.concatenate([best, d], 1)
                best = np.partition(best, k, axis=1)[:, : k + 1]
            out.append(np.partition(best, k, axis=1)[:, k])
        return np.concatenate(out)

    rr, rs = radii(ref), radii(sample)
    s_in, r_in = np.zeros(len(sample), bool), np.zeros(len(ref), bool)
    for i in range(0, len(ref), block):
        for j in range(0, len(sample), block):
            d = d2(ref[i : i + block], sample[j : j + block])
            s_in[j : j + block] |= (d <= rr[i : i + block, None]).any(0)
            r_in[i : i + block] |= (d <= rs[None, j : j + block]).any(1)
    return float(s_in.mean()), float(r_in.mean())


def reference_emulated_pr(ref, sample):
    """The straightforward float16 emulation: every block emulated in full."""
    rr, rs = (manifold.manifold_radii_reference(x) for x in (ref, sample))
    return manifold.precision_recall_from_radii_reference(ref, rr, sample, rs)


def old_reader_pass(path, batch_size=64):
    """The previous reader: the zip member reopened and sought for every batch (Python 3.11's
    zip seek reads and discards everything before the offset)."""
    r = NpzImages(path)
    total = 0
    for start in range(0, len(r), batch_size):
        count = min(batch_size, len(r) - start)
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            f.seek(r.header_len + start * r.row_bytes)
            total += len(f.read(count * r.row_bytes))
    return total


def our_reader_pass(path, batch_size=64):
    return sum(b.nbytes for b in NpzImages(path).batches(batch_size))


# ------------------------------------------------------------------ helpers


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def timed_cpu(fn, *a, **kw):
    """(result, wall seconds, CPU seconds of this process): CPU / wall shows how much of the
    machine the call got when other jobs share it."""
    c, t = _cpu_seconds(), time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t, _cpu_seconds() - c


def wall_cpu(wall, cpu):
    return f"{wall:.1f} s (CPU {cpu:.0f} s)"


def load_note():
    return "load average (1 min) %.2f" % os.getloadavg()[0]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_images(path, n, side, compressed, seed=0, chunk=256):
    """A .npz like np.savez / np.savez_compressed writes (arr_0 only), streamed in chunks of
    synthetic images (smooth colour blocks plus noise, so compression has something to do)."""
    rng = np.random.RandomState(seed)
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    level = 1 if compressed else None  # zlib level 1: quick to write, inflates like level 6
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=level, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, side, side, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                blocks = rng.randint(0, 256, (m, 8, 8, 3)).astype(np.uint8)
                img = np.repeat(np.repeat(blocks, side // 8, 1), side // 8, 2)
                img = img + rng.randint(0, 16, img.shape).astype(np.uint8)
                f.write(np.ascontiguousarray(img).tobytes())


def random_inception(path, seed=0):
    from evaluations.inception import random_state_dict

    torch.save(random_state_dict(seed), path)
    return path


# ------------------------------------------------------------------ parts


def bench_reading(args, work):
    """All files written first, then timed in --repeat interleaved rounds (best of each): a
    fluctuating machine load hits every size alike."""
    kinds = [(n, compressed) for compressed in (False, True) for n in args.sizes]
    paths = {}
    for n, compressed in kinds:
        paths[n, compressed] = path = work / f"read_{n}_{'c' if compressed else 's'}.npz"
        _, t_write = timed(write_images, path, n, args.side, compressed)
        print(f"wrote {path.name} in {t_write:.0f}s", flush=True)
    best = {}
    for round_ in range(args.repeat):
        for key in kinds:
            nbytes, t = timed(our_reader_pass, paths[key])
            best[key] = min(best.get(key, t), t)
            print(f"round {round_}: {key[0]} {'compressed' if key[1] else 'stored'} {t:.2f}s "
                  f"[{load_note()}]", flush=True)
    rows = []
    for compressed in (False, True):
        member = "compressed" if compressed else "stored"
        for n in args.sizes:
            path, t_ours = paths[n, compressed], best[n, compressed]
            old = "-"
            if not compressed and n <= args.old_reader_max:
                _, t_old = timed(old_reader_pass, path)
                old = f"{t_old:.2f} s ({t_old / t_ours:.0f}x)"
            rows.append([f"{n:,}", member, f"{path.stat().st_size / 2**30:.2f} GiB", f"{t_ours:.2f} s",
                         f"{n * args.side * args.side * 3 / t_ours / 2**30:.2f} GiB/s", old])
        lo, hi = min(args.sizes), max(args.sizes)
        rows.append([f"{hi:,} / {lo:,}", member, "", f"ratio {best[hi, compressed] / best[lo, compressed]:.2f} "
                     f"(images x{hi / lo:.0f})", "", ""])
    for path in paths.values():
        path.unlink()
    return table(["images", "member", "file", f"ours (one pass, best of {args.repeat})",
                  "ours (image bytes)", "old reader (reopen + seek per batch)"], rows)


def _fid_rows(feats_s, feats_r, label):
    """FID on one statistic as the evaluator computes it (factors from the activations when
    N <= D): with the cached reference factor, and cold (+ computing that factor), against the
    original's scipy sqrtm."""
    (mu1, s1), t_stats = timed(metrics.compute_statistics, feats_s)
    _, t_np = timed(numpy_statistics, feats_s)
    mu2, s2 = metrics.compute_statistics(feats_r)
    factor, t_factor = timed(lambda: CovarianceFactor.thin(feats_r, s2) or CovarianceFactor.of(s2))
    info = {}
    fid, t_cached = timed(lambda: metrics.frechet_distance(
        mu1, s1, mu2, s2, ref_factor=factor, sample_factor=CovarianceFactor.thin(feats_s, s1), info=info))
    fid_scipy, t_scipy = timed(openai_fid, mu1, s1, mu2, s2)
    rel = abs(fid - fid_scipy) / max(abs(fid_scipy), 1.0)
    print(f"{label}: stats ours {t_stats:.2f}s numpy {t_np:.2f}s | FID cached {t_cached:.2f}s "
          f"({info['route']}) + ref factor {t_factor:.2f}s | scipy {t_scipy:.2f}s | {fid:.10g} vs "
          f"{fid_scipy:.10g} (rel {rel:.1e}) [{load_note()}]", flush=True)
    return [label, f"{len(feats_s):,} x {feats_s.shape[1]}", f"{t_stats:.2f} s / {t_np:.2f} s",
            f"{t_cached:.2f} s ({info['route']})", f"{t_factor:.2f} s", f"{t_factor + t_cached:.2f} s",
            f"{t_scipy:.2f} s", f"{t_scipy / t_cached:.1f}x", f"{fid:.6g}", f"{rel:.1e}"]


FID_HEADER = ["statistic", "sample features", "statistics ours / numpy",
              "FID, cached reference (route)", "reference factor (once, cached)", "FID cold",
              "scipy sqrtm (original)", "scipy / cached", "FID", "rel. difference to scipy"]
PR_HEADER = ["ref x sample", "ours (fp16 decisions)", "plain numpy fp32", "ours / numpy wall (CPU)",
             "full fp16 emulation", "ours / emulation", "P, R ours", "P, R numpy fp32", "load after"]


def _pr_row(ref, sample, with_reference):
    pr, t_ours, c_ours = timed_cpu(metrics.precision_recall, ref, sample, progress=True)
    print(f"P/R ours {wall_cpu(t_ours, c_ours)} {pr} [{load_note()}]", flush=True)
    pr_np, t_np, c_np = timed_cpu(numpy_fp32_pr, ref, sample)
    print(f"P/R numpy fp32 {wall_cpu(t_np, c_np)} {pr_np} [{load_note()}]", flush=True)
    emu, ratio_emu = "not run", "-"
    if with_reference:
        pr_ref, t_ref, c_ref = timed_cpu(reference_emulated_pr, ref, sample)
        assert pr_ref == pr, (pr_ref, pr)
        emu, ratio_emu = f"{wall_cpu(t_ref, c_ref)}, equal", f"{t_ours / t_ref:.2f}"
        print(f"P/R full emulation {wall_cpu(t_ref, c_ref)} {pr_ref} [{load_note()}]", flush=True)
    return [f"{len(ref):,} x {len(sample):,}", wall_cpu(t_ours, c_ours), wall_cpu(t_np, c_np),
            f"{t_ours / t_np:.2f} ({c_ours / c_np:.2f})", emu, ratio_emu,
            f"{pr[0]:.4f}, {pr[1]:.4f}", f"{pr_np[0]:.4f}, {pr_np[1]:.4f}", f"{os.getloadavg()[0]:.2f}"]


def bench_e2e(args, work):
    from evaluations.evaluator import extract
    from evaluations.dist import Comm
    from evaluations.features import InceptionExtractor

    device = args.device
    weights = random_inception(work / "random_inception.pth")
    extractor = InceptionExtractor(weights, "tf", device)
    comm = Comm()
    feats, lines = {}, []
    for name, n in (("ref", args.ref_num), ("sample", args.num)):
        path = work / f"e2e_{name}.npz"
        write_images(path, n, args.side, compressed=False, seed=len(name))
        _, t_read = timed(our_reader_pass, path)
        _, t_old = timed(old_reader_pass, path)
        out, t_ext = timed(extract, NpzImages(path), extractor, comm, 64, name,
                           ("pool", "spatial"), True)
        feats[name] = out
        lines.append([name, f"{n:,}", f"{t_read:.2f} s / {t_old:.2f} s",
                      f"{t_ext:.1f} s", f"{1000 * t_ext / n:.0f} ms",
                      f"{100 * t_read / t_ext:.1f} %"])
        print(f"e2e {name}: read {t_read:.2f}s (old {t_old:.2f}s) read+extract {t_ext:.1f}s "
              f"[{load_note()}]", flush=True)
        path.unlink()
    read_table = table(["file", "images", "reading ours / old reader", "read + Inception (one pass)",
                        "per image", "reading share"], lines)
    fid_rows = [_fid_rows(feats["sample"][k], feats["ref"][k], label)
                for k, label in (("pool", "FID (pool_3)"), ("spatial", "sFID (mixed_6/conv)"))]
    pr = _pr_row(feats["ref"]["pool"], feats["sample"]["pool"], True)
    return "\n\n".join([read_table, table(FID_HEADER, fid_rows), table(PR_HEADER, [pr])])


def bench_metrics(args):
    rng = np.random.RandomState(0)
    ref = rng.rand(args.ref, args.dim).astype(np.float32)
    sample = (rng.rand(args.samples, args.dim) * 1.02).astype(np.float32)
    fid = _fid_rows(sample, ref, f"random {args.dim}-d")
    pr = _pr_row(ref, sample, args.reference_pr)
    return table(FID_HEADER, [fid]) + "\n\n" + table(PR_HEADER, [pr])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["reading", "e2e", "metrics", "all"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--sizes", type=int, nargs=2, default=[5000, 20000], help="reading: image counts")
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="reading: timed rounds (best kept)")
    p.add_argument("--old_reader_max", type=int, default=5000,
                   help="reading: time the old (quadratic) reader up to this many images")
    p.add_argument("--num", type=int, default=1000, help="e2e: sample images")
    p.add_argument("--ref_num", type=int, default=1000, help="e2e: reference images")
    p.add_argument("--ref", type=int, default=10000, help="metrics: reference features")
    p.add_argument("--samples", type=int, default=50000, help="metrics: sample features")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--reference_pr", action="store_true",
                   help="metrics: also time the full float16 emulation (slow at 50k)")
    p.add_argument("--dir", default=None, help="where to write the synthetic files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.side, args.old_reader_max = [200, 800], 64, 800
        args.num, args.ref_num, args.ref, args.samples, args.dim = 96, 80, 600, 900, 256
        args.reference_pr = True
    print(f"# {describe_machine(torch.device(args.device))}; {load_note()}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        out = []
        if args.part in ("reading", "all"):
            out.append(bench_reading(args, work))
        if args.part in ("e2e", "all"):
            out.append(bench_e2e(args, work))
        if args.part in ("metrics", "all"):
            out.append(bench_metrics(args))
    print(f"\n# {load_note()}\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
