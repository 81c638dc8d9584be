"""The SAG visualisation script writes its panels (tiny random models, in process)."""

import importlib.util

from guided_diffusion.image_io import read_png
from sampling_helpers import REPO, TINY_CLASSIFIER_FLAGS, TINY_MODEL_FLAGS, save_classifier, save_model


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
    for name in ("sag_step_3.png", "sag_step_1.png", "sag_comparison.png"):
        assert (tmp_path / "pics" / name).is_file(), out
    step = read_png(tmp_path / "pics" / "sag_step_3.png")
    comparison = read_png(tmp_path / "pics" / "sag_comparison.png")
    cell, zoom = 32 + 2, 4  # image + grid padding; 32 px tiles are enlarged to 128 px by default
    assert step.shape == ((3 * cell + 2) * zoom, (5 * cell + 2) * zoom, 3)  # a row per image, 5 columns
    assert comparison.shape == ((4 * cell + 2) * zoom, (3 * cell + 2) * zoom, 3)  # 4 runs x 3 images
    for picture in (step, comparison):  # enlarged by pixel repetition, not interpolation
        assert (picture[::zoom, ::zoom] == picture[zoom - 1 :: zoom, zoom - 1 :: zoom]).all()
        assert picture.std() > 0
    assert "rows: no guidance; SAG; classifier guidance; SAG + classifier guidance" in out
