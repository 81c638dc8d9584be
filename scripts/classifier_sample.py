"""Generate samples with Self-Attention Guidance and (optionally) classifier guidance.

Flags are those of the original SAG/guided-diffusion ``classifier_sample.py`` (plus --output_dir,
--seed, --save_grid, --progress, --step_progress, --sag_heads); see ``--help``.  As in the
original, the classifier is always loaded (--classifier_path is required) but only used with
``--classifier_guidance True``, and class labels are always drawn and saved.  The logic lives in
``guided_diffusion/sampling.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.sampling import main  # noqa: E402

if __name__ == "__main__":
    main("classifier")
