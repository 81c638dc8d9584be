"""The SAG / PAG / SEG visualisation script writes its panels (tiny random models, in process)."""

import importlib.util
import subprocess

import pytest

from guided_diffusion.image_io import read_png
from mpi_launcher import require_mpiexec
from sampling_helpers import (
    PYTHON,
    REPO,
    TINY_CLASSIFIER_FLAGS,
    TINY_MODEL_FLAGS,
    save_classifier,
    save_model,
    script_env,
)


def load_script():
    spec = importlib.util.spec_from_file_location("visualize_sag", REPO / "scripts" / "visualize_sag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_visualize_writes_step_panels_and_comparison(tmp_path, capsys):
    flags = [*TINY_MODEL_FLAGS, *TINY_CLASSIFIER_FLAGS, "--num_classes", "10"]
    model = save_model(tmp_path / "model.pt", flags)
    clf = save_classifier(tmp_path / "clf.pt", flags)
    load_script().main([*flags, "--model_path", str(model), "--classifier_path", str(clf),
                        "--timestep_respacing", "4", "--steps", "3,1", "--num_images", "3",
                        "--sel_attn_depth", "1", "--blur_sigma", "3", "--out_dir", str(tmp_path / "pics")])
    out = capsys.readouterr().out
    for name in ("sag_step_3.png", "sag_step_1.png", "comparison.png"):
        assert (tmp_path / "pics" / name).is_file(), out
    step = read_png(tmp_path / "pics" / "sag_step_3.png")
    comparison = read_png(tmp_path / "pics" / "comparison.png")
    cell, zoom = 32 + 2, 4  # image + grid padding; 32 px tiles are enlarged to 128 px by default
    assert step.shape == ((3 * cell + 2) * zoom, (5 * cell + 2) * zoom, 3)  # a row per image, 5 columns
    assert comparison.shape == ((4 * cell + 2) * zoom, (3 * cell + 2) * zoom, 3)  # 4 runs x 3 images
    for picture in (step, comparison):  # enlarged by pixel repetition, not interpolation
        assert (picture[::zoom, ::zoom] == picture[zoom - 1 :: zoom, zoom - 1 :: zoom]).all()
        assert picture.std() > 0
    assert "rows: no guidance; SAG; classifier guidance; SAG + classifier guidance" in out


def test_visualize_pag_and_seg_panels_and_rows(tmp_path, capsys):
    """--compare_flags with PAG and SEG flag strings (as classifier_sample.py takes them): a panel
    per step (x_t, x_0 of both passes, their difference, guided x_0) and eight comparison rows;
    the PNGs decode and show something."""
    flags = [*TINY_MODEL_FLAGS, *TINY_CLASSIFIER_FLAGS, "--num_classes", "10"]
    model = save_model(tmp_path / "model.pt", flags)
    clf = save_classifier(tmp_path / "clf.pt", flags)
    script = load_script()
    # as configs/digits.sh writes them: JSON without spaces, split like an unquoted shell variable
    pag_flags = '--guidance_strategies {"attention_mask_identity":[9,0]} --drop_layers input_blocks.5.1 middle_block.1'
    seg_flags = '--guidance_strategies {"seg":[9,0]} --seg_layers middle_block.1 --guide_scale 3'

    common = [*flags, "--model_path", str(model), "--classifier_path", str(clf), "--timestep_respacing", "3"]
    script.main([*common, "--steps", "1", "--num_images", "2", "--sel_attn_depth", "1", "--blur_sigma", "3",
                 "--compare_flags", pag_flags, "--compare_flags", seg_flags, "--fast_attention", "True",
                 "--out_dir", str(tmp_path / "pics")])
    out = capsys.readouterr().out
    cell, zoom = 32 + 2, 4
    for name in ("pag", "seg"):
        panel = read_png(tmp_path / "pics" / f"{name}_step_1.png")
        assert panel.shape == ((2 * cell + 2) * zoom, (5 * cell + 2) * zoom, 3), out
        difference = panel[2 * zoom: (cell + 1) * zoom, (3 * cell + 2) * zoom: (4 * cell + 1) * zoom]
        assert difference.std() > 0  # the perturbed pass differs from the plain one
    comparison = read_png(tmp_path / "pics" / "comparison.png")
    assert comparison.shape == ((8 * cell + 2) * zoom, (2 * cell + 2) * zoom, 3)
    assert ("rows: no guidance; SAG; PAG; SEG; classifier guidance; SAG + classifier guidance; "
            "PAG + classifier guidance; SEG + classifier guidance") in out
    for bad, message in (
            (["--compare_flags", "--drop_layers middle_block.1"], "give --guidance_strategies"),
            (["--compare_flags", pag_flags + " --blur_sigma 3"], "SAG and PAG/SEG requested in one run"),
            (["--compare_flags", pag_flags + " --no_such_flag 3"], "unrecognized arguments: --no_such_flag"),
            (["--compare_flags", """--guidance_strategies '{"seg":[2,0]}'"""], "not valid JSON")):
        with pytest.raises(SystemExit, match=message):
            script.parse_args([*flags, *bad])
    with pytest.raises(SystemExit):
        script.parse_args([*flags, "--guidance_strategies", '{"seg": [2, 0]}'])
    assert "as --compare_flags" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--drop_layers input_blocks.1.1: not an attention block"):
        script.main([*common, "--compare_flags", pag_flags.replace("input_blocks.5.1", "input_blocks.1.1"),
                     "--out_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_visualize_under_mpiexec_draws_the_same_pictures(tmp_path):
    """mpiexec -n 2 shares the rows out among the ranks; the PNGs are those of one process."""
    flags = [*TINY_MODEL_FLAGS, *TINY_CLASSIFIER_FLAGS, "--num_classes", "10"]
    model = save_model(tmp_path / "model.pt", flags)
    clf = save_classifier(tmp_path / "clf.pt", flags)
    common = [*flags, "--model_path", str(model), "--classifier_path", str(clf), "--timestep_respacing", "2",
              "--steps", "1", "--num_images", "1", "--sel_attn_depth", "1", "--blur_sigma", "3",
              "--compare_flags", '--guidance_strategies {"seg":[9,0]} --seg_layers middle_block.1']
    load_script().main([*common, "--out_dir", str(tmp_path / "one")])
    proc = subprocess.run([require_mpiexec(), "-n", "2", PYTHON, str(REPO / "scripts" / "visualize_sag.py"), *common,
                           "--out_dir", str(tmp_path / "two")], env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["comparison.png", "sag_step_1.png", "seg_step_1.png"]
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
