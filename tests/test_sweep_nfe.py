"""The sweep's derived column ``nfe`` (UNet passes per image) from each point's flags, and the
figure of the metrics against it (one line per sampler and guidance scale). No sampling."""

import pytest

from guided_diffusion.sweep import plots
from guided_diffusion.sweep.grid import grid_points
from guided_diffusion.sweep.plan import Planner, make_base
from guided_diffusion.sweep.report import markdown_table, point_rows
from sampling_helpers import TINY_MODEL_FLAGS

BASE = TINY_MODEL_FLAGS + ["--model_path", "m.pt", "--num_samples", "4"]  # 1000 diffusion steps
PAG_WINDOW = '{"attention_mask_identity": [4, 2]}'

# (grid point, expected nfe): steps, plus one pass per guided step (guide_scale != 1, inside the window)
CASES = [
    ({"sampler": "ddpm", "timestep_respacing": "10", "guide_scale": 1.0}, 10),
    ({"sampler": "ddpm", "timestep_respacing": "10", "guide_scale": 1.5}, 20),
    ({"sampler": "ddpm", "timestep_respacing": "", "guide_scale": 1.5}, 1000 + 250),  # guide_start 250
    ({"sampler": "ddpm", "timestep_respacing": "10,5", "guide_scale": 1.0}, 15),
    ({"use_ddim": True, "timestep_respacing": "ddim20", "guide_scale": 1.0}, 20),
    ({"sampler": "ddim", "sampler_steps": 25, "guide_scale": 1.5}, 50),
    ({"sampler": "dpm++", "sampler_steps": 5, "guide_scale": 1.0}, 5),
    ({"sampler": "dpm++", "sampler_steps": 5, "guide_scale": 1.5}, 10),
    ({"sampler": "unipc", "sampler_steps": 7, "guide_scale": 2.0, "guide_start": 3}, 7 + 3),
    ({"sampler": "unipc", "solver_spacing": "999,500,100", "guide_scale": 1.5}, 6),
    ({"sampler": "dpm++", "sampler_steps": 10, "guide_scale": 2.0, "guidance_strategies": PAG_WINDOW}, 10 + 3),
]


def plan(grid):
    planner = Planner(make_base("", "image", BASE), seed=0)
    everyone, _, _, swept = planner.plan(grid_points([], grid, "t.yaml"), None)
    return everyone, swept


def test_nfe_counts_unet_passes_of_every_sampler_and_guidance():
    everyone, swept = plan({"union": [point for point, _ in CASES]})
    assert len(everyone) == len(CASES)
    files = {p.name: f"{p.name}.npz" for p in everyone}
    rows, _ = point_rows(everyone, {p.name: {"fid": 1.0} for p in everyone}, files, swept, ".")
    assert [r["nfe"] for r in rows] == [nfe for _, nfe in CASES]
    table = markdown_table(rows, ["fid"], swept, "t")
    assert table.splitlines()[2].split(" | ")[-2:] == ["nfe", "FID |"]


def test_figure_against_nfe_has_a_line_per_sampler_and_scale(tmp_path, monkeypatch):
    from PIL import Image

    everyone, swept = plan({"union": [
        [{"sampler": ["dpm++", "unipc"]}, {"sampler_steps": [5, 10]}, {"guide_scale": [1.0, 1.5]}],
        [{"sampler": "ddpm"}, {"timestep_respacing": ["10", "25"]}, {"guide_scale": [1.0, 1.5]}],
        {"sampler": "dpm++", "sampler_steps": 10, "guide_scale": 1.5, "seed": 1},
    ]})
    from guided_diffusion.sweep.derived import derive

    records = [{"settings": p.settings, "seed": p.args.seed, "label": p.label, "derived": derive(p.args),
                "metrics": {"fid": float(derive(p.args)["nfe"]) + p.args.seed, "recall": 0.5}} for p in everyone]
    seen = {}
    real = plots.metric_figure

    def spy(path, group, records, metrics, others, *rest, **kw):
        seen.update(others=others, xs={kw["x_of"](r) for r in records}, log=kw["log_x"])
        return real(path, group, records, metrics, others, *rest, **kw)

    monkeypatch.setattr(plots, "metric_figure", spy)
    path = plots.derived_figure(str(tmp_path), "nfe", records, swept, ["fid", "recall"], [], "", 0, "t")
    assert path.endswith("fig_nfe.png")
    # sampler_steps and timestep_respacing are what nfe stands for: lines per sampler x guide_scale
    assert seen == {"others": [("sampler",), ("guide_scale",)], "xs": {5, 10, 20, 25, 50}, "log": True}
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 300
    for r in records:
        r["derived"]["nfe"] = None
    assert plots.derived_figure(str(tmp_path), "nfe", records, swept, ["fid"], [], "", 0, "t") is None


@pytest.mark.parametrize("own", [["--x_axis", "steps"]])
def test_unknown_x_axis_is_refused(own, capsys):
    from guided_diffusion.sweep.main import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--out", "x", *own])
    assert exc.value.code == 2
    assert "--x_axis: invalid choice: 'steps' (choose from 'nfe')" in capsys.readouterr().err
