"""The --sampler flags of both sampling scripts (guided_diffusion/sampler_choice.py): resolution,
one-line errors that write nothing, the solver presets, and SAG + classifier guidance through
DPM-Solver++ under mpiexec -n 2 = one rank = a killed-and-resumed run."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion import sampling
from guided_diffusion.sampler_choice import describe_sampler, resolve_sampler, sampling_loop
from sampling_helpers import (REPO, TINY_CLASSIFIER_FLAGS, TINY_MODEL_FLAGS, TINY_SAMPLE_FLAGS,
                              kill_after_shards, parse, run_script, save_classifier, save_model, snapshot,
                              start_script)

SOLVER_FLAGS = ["--sampler", "dpm++", "--sampler_steps", "4"]


def tiny_args(*extra, kind="classifier"):
    return parse(kind, TINY_MODEL_FLAGS + TINY_SAMPLE_FLAGS + list(extra))


def test_defaults_follow_use_ddim_and_the_flags_resolve():
    assert resolve_sampler(tiny_args()) == {"sampler": "ddpm"}
    assert resolve_sampler(tiny_args("--use_ddim", "True")) == {"sampler": "ddim", "steps": None}
    assert resolve_sampler(tiny_args("--use_ddim", "True", "--sampler", "ddpm"))["sampler"] == "ddpm"
    choice = resolve_sampler(tiny_args("--sampler", "unipc"))
    assert {k: choice[k] for k in ("steps", "order", "solver_type", "spacing", "final")} == dict(
        steps=20, order=2, solver_type="bh2", spacing="linspace", final="zero")
    # The tiny model runs the cosine schedule: DPM-Solver++ clips lambda at -5.1 (starts at 995).
    choice = resolve_sampler(tiny_args("--sampler", "dpm++", "--solver_order", "3", "--solver_type", "heun",
                                       "--solver_spacing", "trailing", "--sampler_steps", "5"))
    assert (choice["order"], choice["solver_type"], choice["timesteps"]) == (3, "heun", [995, 795, 595, 395, 195])
    choice = resolve_sampler(tiny_args("--sampler", "dpm++", "--solver_spacing", "900,500,100"))
    assert choice["steps"] == 3 and choice["timesteps"] == [900, 500, 100]
    line = describe_sampler(tiny_args("--sampler", "dpm++", "--solver_spacing", "ddim", "--sampler_steps", "10"))
    assert line == "sampler: dpm++ (order 2, midpoint), 10 steps at timesteps 900, 800, ..., 0; final zero"


def test_sampling_loop_picks_the_diffusion_each_sampler_needs():
    """DDPM/DDIM use the flags' (respaced) diffusion; DDIM with --sampler_steps N the ddimN one;
    the solvers the full schedule, whatever --timestep_respacing says."""
    from guided_diffusion import script_util as su

    args = tiny_args()
    _, diffusion = su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults()))
    assert sampling_loop(diffusion, args) == diffusion.p_sample_loop
    args = tiny_args("--sampler", "ddim")
    assert sampling_loop(diffusion, args) == diffusion.ddim_sample_loop
    loop = sampling_loop(diffusion, tiny_args("--sampler", "ddim", "--sampler_steps", "10"))
    assert loop.__self__.timestep_map == list(range(0, 1000, 100))
    loop = sampling_loop(diffusion, tiny_args("--sampler", "unipc", "--solver_type", "bh1"))
    assert loop.func.__name__ == "unipc_sample_loop" and loop.keywords["solver_type"] == "bh1"
    assert loop.func.__self__.timestep_map == list(range(1000))  # not respaced to 3 steps


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return dict(model=str(save_model(root / "model.pt", TINY_MODEL_FLAGS)),
                classifier=str(save_classifier(root / "classifier.pt", TINY_MODEL_FLAGS + TINY_CLASSIFIER_FLAGS)))


def flags(ckpts, out, *extra):
    """classifier_sample.py with SAG (defaults: scale 1.5, every step) + classifier guidance."""
    return (TINY_MODEL_FLAGS + TINY_SAMPLE_FLAGS + TINY_CLASSIFIER_FLAGS
            + ["--model_path", ckpts["model"], "--classifier_path", ckpts["classifier"],
               "--classifier_guidance", "True", "--classifier_scale", "2.0", "--sel_attn_depth", "1",
               "--output_dir", str(out)] + list(extra))


def one_error_line(code, stderr, *needles):
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD = [
    (["--sampler", "dpm+"], ["unknown --sampler 'dpm+'", "ddpm, ddim, dpm++, unipc"]),
    (["--sampler", "dpm++", "--solver_order", "0"], ["--solver_order must be 1, 2 or 3, got 0"]),
    (["--sampler", "unipc", "--solver_order", "4"], ["--solver_order must be 1, 2 or 3, got 4"]),
    (["--sampler", "dpm++", "--sampler_steps", "0"], ["--sampler_steps must be between 1 and", "1000"]),
    (["--sampler", "unipc", "--sampler_steps", "1001"], ["--sampler_steps must be between 1 and", "1001"]),
    (["--sampler", "dpm++", "--sampler_steps", "1000"], ["repeats timestep"]),
    (["--sampler", "unipc", "--solver_spacing", "999,500,500"], ["repeats timestep(s) [500]"]),
    (["--sampler_steps", "10"], ["--sampler_steps does not apply to --sampler ddpm", "--timestep_respacing"]),
    (["--sampler", "ddpm", "--sampler_steps", "10"], ["does not apply to --sampler ddpm"]),
    (["--sampler", "unipc", "--solver_type", "midpoint"], ["not a UniPC type", "bh2 or bh1"]),
    (["--sampler", "dpm++", "--solver_final", "sigma"], ["unknown --solver_final"]),
    (["--sampler", "dpm++", "--solver_spacing", "ddim25", "--sampler_steps", "20"], ["has 25 timesteps"]),
]


RUN = SOLVER_FLAGS + ["--num_samples", "5", "--batch_size", "1"]
NPZ = "samples_5x32x32x3.npz"


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, ckpts):
    """A finished one-rank run: SAG + classifier guidance through DPM-Solver++(2M), 4 steps."""
    out = tmp_path_factory.mktemp("runs") / "one"
    result = run_script("classifier", flags(ckpts, out, *RUN))
    assert result.returncode == 0, result.stderr
    return out


def test_bad_sampler_flags_give_one_line_and_write_nothing(tmp_path, ckpts, one_rank_run, capsys):
    finished = one_rank_run
    before = snapshot(finished)
    fresh = tmp_path / "fresh"
    for extra, needles in BAD:
        with pytest.raises(SystemExit) as info:
            sampling.main("classifier", [str(a) for a in flags(ckpts, fresh, *extra)])
        one_error_line(info.value.code, capsys.readouterr().err, *needles)
        # The same flags against a finished run: refused the same way, the run untouched.
        with pytest.raises(SystemExit):
            sampling.main("classifier", [str(a) for a in flags(ckpts, finished, *RUN, *extra)])
        capsys.readouterr()
    # A resumed run with another sampler (or other solver settings) is refused, naming the flag.
    for extra, needle in ((["--sampler", "unipc"], "--sampler"), (["--solver_order", "3"], "--solver_order"),
                          (["--sampler_steps", "5"], "--sampler_steps")):
        with pytest.raises(SystemExit) as info:
            sampling.main("classifier", [str(a) for a in flags(ckpts, finished, *RUN, *extra)])
        one_error_line(info.value.code, capsys.readouterr().err, "other arguments", needle)
    # As a real process (image_sample.py): one line on stderr, non-zero exit.
    image_flags = TINY_MODEL_FLAGS + TINY_SAMPLE_FLAGS + ["--model_path", ckpts["model"], "--output_dir",
                                                          str(fresh), "--sampler", "euler"]
    proc = run_script("image", image_flags)
    one_error_line(proc.returncode, proc.stderr, "unknown --sampler 'euler'")
    assert snapshot(finished) == before and not fresh.exists()


def test_dpm_solver_with_sag_and_classifier_guidance_two_ranks_and_resume(tmp_path, ckpts, one_rank_run):
    """SAG + classifier guidance through DPM-Solver++(2M), 4 steps: one rank, two ranks under
    mpiexec and a SIGKILLed-then-resumed run give the same npz, byte for byte."""
    log = (one_rank_run / "log.txt").read_text()
    assert "sampler: dpm++ (order 2, midpoint), 4 steps at timesteps 995, 746, 498, 249; final zero" in log
    reference = (one_rank_run / NPZ).read_bytes()
    with np.load(one_rank_run / NPZ) as data:
        assert data["arr_0"].std() > 0 and len({x.tobytes() for x in data["arr_0"]}) == 5
    two = run_script("classifier", flags(ckpts, tmp_path / "two", *RUN), nproc=2)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two" / NPZ).read_bytes() == reference

    out = tmp_path / "killed"
    proc = start_script("classifier", flags(ckpts, out, *RUN))
    done = kill_after_shards(proc, out)
    assert 2 <= len(done) < 5 and not (out / NPZ).exists()
    resumed = run_script("classifier", flags(ckpts, out, *RUN))
    assert resumed.returncode == 0, resumed.stderr
    log = (out / "log.txt").read_text()
    assert f"{len(done)} batch(es) already done" in log, (done, log)
    assert (out / NPZ).read_bytes() == reference


PRESETS = {"imagenet256_uncond_dpmpp20": "classifier", "imagenet128_cg_dpmpp20": "classifier"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_solver_presets(name):
    """The 20-step DPM-Solver++ SAG presets: published SAG flags, every step guided."""
    shown = subprocess.run(["bash", "-c", f'source "{REPO}/configs/{name}.sh" && echo "$SAG_FLAGS $MODEL_FLAGS '
                            '$CLASSIFIER_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS"'],
                           capture_output=True, text=True, timeout=60, check=True).stdout.split()
    args = parse(PRESETS[name], shown)
    sampling.validate_args(args)
    choice = resolve_sampler(args)
    assert (choice["sampler"], choice["steps"], choice["order"]) == ("dpm++", 20, 2)
    assert args.guide_start >= 20 and args.timestep_respacing == "" and args.num_samples == 10000
    assert Path(REPO / "configs" / f"{name}.sh").read_text().count("run_preset classifier_sample.py") == 1


def test_visualize_sag_refuses_the_solver_flags(capsys):
    """scripts/visualize_sag.py draws DDPM/DDIM runs only: the sampler flags it inherits are refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize_sag", REPO / "scripts" / "visualize_sag.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--sampler", "dpm++"])
    assert info.value.code == 2 and "this script draws DDPM or DDIM runs only" in capsys.readouterr().err
