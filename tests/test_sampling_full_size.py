"""The published 128x128 (classifier_sample) and LSUN (image_sample) command lines, run for real
through their presets on randomly initialised full-size checkpoints: load strictly and sample
(batch 1, 2 respaced steps: one respaced step is not a valid diffusion).  Slow: minutes on CPU."""

import numpy as np
import pytest

from sampling_helpers import REPO, save_classifier, save_model, script_env
from test_sampling_scripts import preset_command

pytestmark = pytest.mark.slow


def run_preset(name, tmp_path, ckpt_flags_from, **paths):
    import subprocess

    script, words = preset_command(name)
    extra = [f"--{k}={v}" for k, v in paths.items()]
    extra += ["--num_samples", "1", "--batch_size", "1", "--timestep_respacing", "2",
              "--output_dir", str(tmp_path / "out"), "--seed", "0", "--progress", "False",
              # float32 weights of the same layout: fp16 convolutions on CPUs without AVX512-FP16
              # take minutes per pass (convert_to_fp16 is unit-tested in test_diffusion_units).
              "--use_fp16", "False"]
    result = subprocess.run(["bash", str(REPO / "configs" / f"{name}.sh"), *extra], env=script_env(),
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    size = 128 if "128" in name else 256
    with np.load(tmp_path / "out" / f"samples_1x{size}x{size}x3.npz") as data:
        assert data["arr_0"].shape == (1, size, size, 3)
        return data.files


def test_imagenet128_cg_full_size(tmp_path):
    _, words = preset_command("imagenet128_cg")
    model = save_model(tmp_path / "m.pt", words, randomize=False)
    classifier = save_classifier(tmp_path / "c.pt", words, randomize=False)
    assert run_preset("imagenet128_cg", tmp_path, words, model_path=model, classifier_path=classifier) == ["arr_0", "arr_1"]


def test_lsun_cat_full_size(tmp_path):
    _, words = preset_command("lsun_cat")
    model = save_model(tmp_path / "m.pt", words, randomize=False)
    assert run_preset("lsun_cat", tmp_path, words, model_path=model) == ["arr_0"]
