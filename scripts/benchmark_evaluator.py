"""Benchmark (not a test): FID and precision/recall time, ours vs scipy/numpy references.

    python scripts/benchmark_evaluator.py            # 10k and 50k x 2048 random features
    python scripts/benchmark_evaluator.py --quick    # tiny smoke run
Prints absolute times and ours/reference ratios, measured in the same run.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluations import metrics  # noqa: E402


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def numpy_pr(ref, sample, k=3):
    def d2(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)
    rr = np.partition(d2(ref, ref), k, axis=1)[:, k]
    rs = np.partition(d2(sample, sample), k, axis=1)[:, k]
    d = d2(ref, sample)
    return float((d <= rr[:, None]).any(0).mean()), float((d <= rs[None]).any(1).mean())


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    sizes, dim = ([500], 64) if args.quick else ([10000, 50000], 2048)
    rng = np.random.RandomState(0)
    for n in sizes:
        a = rng.rand(n, dim).astype(np.float32)
        b = (rng.rand(n, dim) * 1.1).astype(np.float32)
        (st_a, st_b), t_stats = timed(lambda: (metrics.compute_statistics(a, args.device),
                                               metrics.compute_statistics(b, args.device)))
        ours, t_ours = timed(metrics.frechet_distance, *st_a, *st_b, args.device)
        ref, t_ref = timed(scipy_fid, *st_a, *st_b)
        print(f"N={n} D={dim} stats {t_stats:.2f}s | FID ours {t_ours:.3f}s scipy-sqrtm {t_ref:.3f}s "
              f"ratio {t_ours / t_ref:.3f} | values {ours:.6f} vs {ref:.6f}")
        pr, t_pr = timed(metrics.precision_recall, a, b, 3, True, args.device)
        line = f"N={n} D={dim} P/R ours(fp16-emulated) {t_pr:.3f}s {pr}"
        if n <= 10000:  # the plain numpy reference needs N x N matrices in memory
            pr_np, t_np = timed(numpy_pr, a, b)
            line += f" | numpy fp32 {t_np:.3f}s {pr_np} ratio {t_pr / t_np:.3f}"
        print(line)


if __name__ == "__main__":
    main()
