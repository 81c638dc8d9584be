"""Generate samples with SAG, PAG or SEG and (optionally) classifier guidance.

Flags are those of the original SAG/guided-diffusion ``classifier_sample.py`` and of the PAG
repository's (--guidance_strategies, --drop_layers, ...; see ``guided_diffusion/pag_flags.py``),
plus --output_dir, --seed, --save_grid, --progress, --step_progress, --sag_heads; see ``--help``.
The classifier is loaded (--classifier_path) only with ``--classifier_guidance True``; class
labels are always drawn and saved, as in both originals.  The logic lives in
``guided_diffusion/sampling.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.sampling import main  # noqa: E402

if __name__ == "__main__":
    main("classifier")
