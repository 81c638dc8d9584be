"""Generate samples from a diffusion model with SAG, PAG or SEG.

Flags are those of the original SAG/guided-diffusion ``image_sample.py`` and of the PAG
repository's (see ``guided_diffusion/pag_flags.py``), plus --output_dir, --seed, --save_grid,
--progress, --step_progress, --sag_heads; see ``--help``.  The run is
sharded over MPI ranks (``mpiexec -n N``) and resumable; the logic lives in
``guided_diffusion/sampling.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.sampling import main  # noqa: E402

if __name__ == "__main__":
    main("image")
