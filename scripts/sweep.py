"""Sweep sampling flags over a grid, evaluate every point in one evaluator run, tabulate and plot.

    python scripts/sweep.py --preset digits --out runs/sweep --ref datasets/digits32.npz \
        --features classifier --grid guide_scale=1.5,2,3 --grid blur_sigma=1,3 -- --num_samples 64

Re-running the same command resumes: finished points and evaluations are not redone; a grid with
new values only samples the new points. See docs/sweeps.md and ``--help``; the logic lives in
``guided_diffusion/sweep/``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.sweep.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
