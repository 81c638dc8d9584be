"""Sweep grids and planning without sampling: the grid syntax (product, zip, union, nested),
list- and JSON-valued flags (PAG's), point names, and bad input (one
clear line, exit status 1, nothing written)."""

import pytest

from guided_diffusion.sweep.grid import GridError, expand, grid_points, load_grid_file, split_values
from guided_diffusion.sweep.main import main
from guided_diffusion.sweep.plan import PlanError, Planner, make_base, point_name
from sampling_helpers import TINY_MODEL_FLAGS

BASE = TINY_MODEL_FLAGS + ["--model_path", "m.pt", "--num_samples", "4"]


def test_values_split_at_top_level_commas_only():
    assert split_values('1.0, 1.5,"16,8",{"a": [1, 2]},[3,4]') == ["1.0", "1.5", "16,8", '{"a": [1, 2]}', "[3,4]"]
    with pytest.raises(GridError, match="unbalanced"):
        split_values('{"a": 1')


def test_product_zip_union_and_nested_axes():
    grid = {"union": [
        [{"guide_scale": [1.5, 2]}, {"zip": {"sel_attn_block": ["output", "middle"], "sel_attn_depth": [2, 0]}}],
        {"sel_attn_block": {"input": {"sel_attn_depth": [4, 5]}, "middle": None}},
    ]}
    assert expand(grid) == [
        {"guide_scale": 1.5, "sel_attn_block": "output", "sel_attn_depth": 2},
        {"guide_scale": 1.5, "sel_attn_block": "middle", "sel_attn_depth": 0},
        {"guide_scale": 2, "sel_attn_block": "output", "sel_attn_depth": 2},
        {"guide_scale": 2, "sel_attn_block": "middle", "sel_attn_depth": 0},
        {"sel_attn_block": "input", "sel_attn_depth": 4},
        {"sel_attn_block": "input", "sel_attn_depth": 5},
        {"sel_attn_block": "middle"},
    ]
    assert grid_points(["guide_scale=1,2", "blur_sigma=3"]) == [
        {"guide_scale": "1", "blur_sigma": "3"}, {"guide_scale": "2", "blur_sigma": "3"}]
    with pytest.raises(GridError, match="swept twice"):
        grid_points(["guide_scale=1", "guide_scale=2"])


def test_list_and_json_flags_are_sweepable(tmp_path):
    """PAG's --drop_layers (a list) and --guidance_strategies (JSON) through the real parser."""
    grid_file = tmp_path / "pag.yaml"
    grid_file.write_text(
        "- guidance_strategies: [{attention_mask_identity: [25, 0]}, {attention_mask_identity: [10, 0]}]\n"
        "- drop_layers: [[input_blocks.7.1, middle_block.1], middle_block.1]\n")
    planner = Planner(make_base("", "image", BASE), seed=3)
    points = planner.plan(grid_points(["guide_scale=2"], load_grid_file(str(grid_file))[0]))[1]
    assert len(points) == 4
    assert points[0].tokens == ["--guidance_strategies", '{"attention_mask_identity":[25,0]}',
                                "--drop_layers", "input_blocks.7.1", "middle_block.1", "--guide_scale", "2"]
    assert points[0].args.drop_layers == ["input_blocks.7.1", "middle_block.1"]
    assert points[3].args.guidance_strategies == {"attention_mask_identity": [10, 0]}
    assert points[1].args.drop_layers == ["middle_block.1"] and points[1].args.seed == 3
    assert all(set(p.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+=-") for p in points)
    assert len({p.name for p in points}) == 4
    # The same from the command line: a space-separated list, JSON kept whole.
    cli = planner.plan(grid_points(['drop_layers=input_blocks.7.1 middle_block.1,middle_block.1',
                                    'guidance_strategies={"attention_mask_identity": [25, 0]}']))[1]
    assert [p.args.drop_layers for p in cli] == [["input_blocks.7.1", "middle_block.1"], ["middle_block.1"]]
    with pytest.raises(PlanError, match="guidance_strategies"):
        planner.plan(grid_points(['guidance_strategies={"attention_mask_identity": [25 0]}']))


def test_point_names_follow_the_settings():
    assert point_name({"guide_scale": 1.5, "blur_sigma": 3.0}, "f" * 16) == "guide_scale=1.5__blur_sigma=3"
    assert point_name({"x": "a b/c"}, "0123456789abcdef") == "x=a-b-c-01234567"


def test_equal_points_are_sampled_once_and_the_baseline_reuses_a_grid_point():
    planner = Planner(make_base("", "image", BASE + ["--blur_sigma", "3"]), seed=0)
    everyone, grid, baseline, swept = planner.plan(
        grid_points(["guide_scale=1.0,1,1.5", "blur_sigma=3"]), {"guide_scale": "1.0"})
    assert [p.name for p in everyone] == ["guide_scale=1__blur_sigma=3", "guide_scale=1.5__blur_sigma=3"]
    assert baseline is everyone[0] and baseline.baseline and everyone[0].aliases == ["guide_scale=1__blur_sigma=3"]


def run_main(tmp_path, capsys, *own, base=BASE):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    out = tmp_path / "out"
    code = main(["--script", "image", "--out", str(out), "--ref", str(ref), *own, "--", *base])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()  # nothing sampled, nothing written
    return err


@pytest.mark.parametrize("own, message", [
    (["--grid", "guide_scal=1,2"], "grid key 'guide_scal' is not a flag of image_sample.py (did you mean guide_scale?)"),
    (["--grid", "guide_scale=abc", "--grid", "nope=1"], "grid key 'nope' is not a flag"),
    (["--grid", "guide_scale=1.5,abc"], "argument --guide_scale: invalid float value: 'abc'"),
    (["--grid", "blur_sigma=3,-1"], "--blur_sigma must be positive, got -1.0"),
    (["--grid", "use_ddim=maybe"], "argument --use_ddim: boolean value expected"),
    (["--grid", "output_dir=a,b"], "the sweep sets --output_dir"),
    ([], "empty grid"),
    (["--grid", "guide_scale="], "no values for guide_scale"),
    (["--grid", "guide_scale=1,,2"], "an empty value"),
])
def test_bad_grid_is_one_line(tmp_path, capsys, own, message):
    assert message in run_main(tmp_path, capsys, *own)


def test_zipped_axes_of_different_lengths(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("zip:\n  guide_scale: [1.5, 2, 3]\n  blur_sigma: [1, 3]\n")
    err = run_main(tmp_path, capsys, "--grid_file", str(grid))
    assert "zipped axes have different lengths (guide_scale: 3, blur_sigma: 2)" in err
    grid.write_text("[guide_scale: [1.5\n")
    assert "is not valid YAML" in run_main(tmp_path, capsys, "--grid_file", str(grid))


def test_bad_base_command(tmp_path, capsys):
    assert "base command: image_sample.py rejects it: unrecognized arguments: --no_such_flag" in run_main(
        tmp_path, capsys, "--grid", "guide_scale=2", base=BASE + ["--no_such_flag", "1"])
    assert "--output_dir is set by the sweep" in run_main(
        tmp_path, capsys, "--grid", "guide_scale=2", base=BASE + ["--output_dir", "x"])
    assert "no such preset" in run_main(tmp_path, capsys, "--preset", "nope", "--grid", "guide_scale=2")


def test_zipped_keys_are_one_figure_axis_and_seeds_are_repeats(tmp_path):
    from PIL import Image

    from guided_diffusion.sweep.plots import metric_figures, parameters

    records = []
    for scale in (1.5, 2.0):
        for block, depth in (("output", 2), ("middle", 0)):
            for seed in ((0, 1) if scale == 2.0 and block == "output" else (0,)):
                settings = {"guide_scale": scale, "sel_attn_block": block, "sel_attn_depth": depth, "seed": seed}
                records.append({"settings": settings, "seed": seed, "label": str(settings),
                                "metrics": {"fid": 10 * scale + depth + seed, "recall": 0.5}})
    swept = ["guide_scale", "sel_attn_block", "sel_attn_depth", "seed"]
    assert parameters(records, swept) == [("guide_scale",), ("sel_attn_block", "sel_attn_depth")]
    baseline = [{"settings": {}, "seed": s, "label": "", "metrics": {"fid": 30.0 + s, "recall": 0.4}} for s in (0, 1)]
    paths = metric_figures(str(tmp_path), records, swept, ["fid", "recall"], baseline, "guide_scale=1.0", 0, "t")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["fig_guide_scale.png", "fig_sel_attn_block+sel_attn_depth.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 400 and image.size[1] > 300
