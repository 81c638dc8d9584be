"""End-to-end tests of scripts/image_sample.py and scripts/classifier_sample.py on tiny models:
MPI runs, rank-count independence, crash + resume, error lines, published command lines."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sampling_helpers import (REPO, TINY_CLASSIFIER_FLAGS, TINY_MODEL_FLAGS, TINY_SAMPLE_FLAGS,
                              kill_after_shards, parse, run_script, save_classifier, save_model,
                              script_env, snapshot, start_script)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return dict(
        model=str(save_model(root / "model.pt", TINY_MODEL_FLAGS)),
        uncond=str(save_model(root / "uncond.pt", TINY_MODEL_FLAGS + ["--class_cond", "False"])),
        classifier=str(save_classifier(root / "classifier.pt", TINY_MODEL_FLAGS + TINY_CLASSIFIER_FLAGS)),
    )


def flags(kind, ckpts, out, *extra):
    common = TINY_MODEL_FLAGS + TINY_SAMPLE_FLAGS + ["--model_path", ckpts["model"], "--output_dir", str(out)]
    if kind == "classifier":
        common += TINY_CLASSIFIER_FLAGS + ["--classifier_path", ckpts["classifier"],
                                           "--classifier_guidance", "True", "--classifier_scale", "2.0"]
    return common + list(extra)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def npz(out, n=5):
    return Path(out) / f"samples_{n}x32x32x3.npz"


@pytest.mark.parametrize("kind", ["classifier", "image"])
def test_two_ranks_match_one_rank(tmp_path, ckpts, kind):
    ok(run_script(kind, flags(kind, ckpts, tmp_path / "n1")))
    ok(run_script(kind, flags(kind, ckpts, tmp_path / "n2", "--save_grid", "4"), nproc=2))
    one, two = npz(tmp_path / "n1"), npz(tmp_path / "n2")
    assert one.read_bytes() == two.read_bytes()
    with np.load(two) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].shape == (5, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].shape == (5,) and data["arr_1"].dtype == np.int64
        assert data["arr_1"].min() >= 0 and data["arr_1"].max() < 1000
        assert data["arr_0"].std() > 0 and len({x.tobytes() for x in data["arr_0"]}) == 5
    files = {p.name for p in (tmp_path / "n2").iterdir()}
    assert {"args.json", "config.yaml", "log.txt", "samples_grid.png", two.name} <= files
    assert "shards" not in files  # merged and cleaned up


def test_image_sample_unconditional_has_no_labels(tmp_path, ckpts):
    extra = ["--class_cond", "False", "--model_path", ckpts["uncond"], "--num_samples", "3",
             "--classifier_guidance", "True"]  # accepted and ignored by image_sample.py
    ok(run_script("image", flags("image", ckpts, tmp_path / "u", *extra), nproc=2))
    with np.load(npz(tmp_path / "u", 3)) as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 32, 32, 3)


def test_classifier_sample_without_guidance_still_saves_labels(tmp_path, ckpts):
    extra = ["--class_cond", "False", "--model_path", ckpts["uncond"], "--classifier_guidance", "False",
             "--classifier_scale", "0.0", "--num_samples", "2", "--use_ddim", "True"]
    ok(run_script("classifier", flags("classifier", ckpts, tmp_path / "c", *extra)))
    with np.load(npz(tmp_path / "c", 2)) as data:
        assert data["arr_1"].shape == (2,) and data["arr_1"].dtype == np.int64


def test_fp16_weights_on_cpu_sample_with_a_warning(tmp_path, ckpts):
    extra = ["--use_fp16", "True", "--num_samples", "1", "--batch_size", "1", "--timestep_respacing", "2"]
    ok(run_script("image", flags("image", ckpts, tmp_path / "h", *extra)))
    assert "warning: fp16 weights on a CPU" in (tmp_path / "h" / "log.txt").read_text()
    assert npz(tmp_path / "h", 1).is_file()
    ok(run_script("image", flags("image", ckpts, tmp_path / "f", *extra[2:])))
    assert "warning" not in (tmp_path / "f" / "log.txt").read_text()


def test_sigkill_then_resume_gives_identical_npz(tmp_path, ckpts):
    extra = ["--num_samples", "8", "--batch_size", "1"]
    ok(run_script("image", flags("image", ckpts, tmp_path / "ref", *extra)))
    out = tmp_path / "killed"
    proc = start_script("image", flags("image", ckpts, out, *extra))
    done = kill_after_shards(proc, out)
    assert 2 <= len(done) < 8 and not npz(out, 8).exists()
    kept = {name: (out / "shards" / name).read_bytes() for name in done}
    resumed = ok(run_script("image", flags("image", ckpts, out, *extra), nproc=2))  # other rank count
    assert f"{len(done)} batch(es) already done" in (out / "log.txt").read_text()
    assert npz(out, 8).read_bytes() == npz(tmp_path / "ref", 8).read_bytes()
    assert kept and not (out / "shards").exists(), resumed.stdout
    # A finished run re-run with the same command does nothing.
    again = ok(run_script("image", flags("image", ckpts, out, *extra)))
    assert "already complete" in again.stdout


def one_error_line(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_in_process(kind, argv, capsys):
    """sampling.main in this process (no interpreter start-up); returns (exit code, stderr)."""
    from guided_diffusion.sampling import main

    with pytest.raises(SystemExit) as info:
        main(kind, [str(a) for a in argv])
    return subprocess.CompletedProcess(argv, info.value.code, "", capsys.readouterr().err)


def test_bad_inputs_give_one_line_and_touch_nothing(tmp_path, ckpts, capsys):
    finished = tmp_path / "finished"
    ok(run_script("image", flags("image", ckpts, finished, "--num_samples", "2")))
    before = snapshot(finished)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    fresh = tmp_path / "fresh"
    cases = [
        (["--output_dir", str(finished), "--num_samples", "2", "--guide_scale", "1.2"], ["other arguments", "guide_scale"]),
        (["--model_path", str(tmp_path / "missing.pt")], ["not found", "missing.pt"]),
        (["--model_path", str(garbage)], ["cannot read"]),
        (["--model_path", ckpts["uncond"]], ["does not match", "--class_cond False", "label_emb"]),
        (["--sel_attn_depth", "5"], ["valid", "output 3"]),
        (["--guide_scale", "nan"], ["finite"]),
    ]
    for extra, needles in cases:
        one_error_line(run_in_process("image", flags("image", ckpts, fresh, *extra), capsys), *needles)
    # As real processes (single, then under mpiexec): one line, non-zero exit, no traceback.
    one_error_line(run_script("classifier", flags("classifier", ckpts, fresh, "--classifier_path",
                                                  str(tmp_path / "nope.pt"))), "classifier checkpoint not found")
    assert snapshot(finished) == before
    assert not fresh.exists()
    one_error_line(run_script("image", flags("image", ckpts, finished, "--num_samples", "2", "--seed", "8"),
                              nproc=2), "other arguments")
    assert snapshot(finished) == before
    assert not fresh.exists()


# ------------------------------------------------------------------ published command lines (CLI.md)

PUBLISHED = {
    "imagenet128_cg": (
        "classifier",
        "--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 8 --blur_sigma 3 --classifier_guidance True "
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
        "--classifier_scale 0.5 --classifier_path models/128x128_classifier.pt --model_path models/128x128_diffusion.pt "
        "--batch_size 64 --num_samples 10000 --timestep_respacing 250"),
    "imagenet256_uncond": (
        "classifier",
        "--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False "
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
        "--classifier_scale 0.0 --classifier_path models/256x256_classifier.pt --model_path models/256x256_diffusion.pt "
        "--batch_size 16 --num_samples 10000 --timestep_respacing 250"),
    "lsun_cat": (
        "image",
        "--guide_scale 1.05 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False "
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
        "--model_path models/lsun_cat.pt --batch_size 16 --num_samples 10000 --timestep_respacing 250"),
    "lsun_horse": (
        "image",
        "--guide_scale 1.01 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False "
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
        "--model_path models/lsun_horse.pt --batch_size 16 --num_samples 10000 --timestep_respacing 250"),
}


def preset_command(name, *extra, run=False):
    """(script, flags) a preset runs: from its printed command when ``run`` (the script is started
    with --help), else from the variables it exports when sourced."""
    preset = REPO / "configs" / f"{name}.sh"
    if run:
        result = subprocess.run(["bash", str(preset), *extra, "--help"], env=script_env(),
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
        words = [line for line in result.stderr.splitlines() if line.startswith("+ ")][0].split()
        return os.path.basename(words[2]), words[3:-1]
    shown = subprocess.run(["bash", "-c", f'source "{preset}" && echo "$SAG_FLAGS $MODEL_FLAGS '
                            '$CLASSIFIER_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS" && '
                            'grep -o "run_preset [a-z_]*.py" "' + str(preset) + '"'],
                           capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    return shown[1].split()[1], shown[0].split() + list(extra)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_run_the_published_command_lines(name):
    kind, line = PUBLISHED[name]
    script, words = preset_command(name, run=name == "imagenet128_cg")
    assert script == f"{kind}_sample.py" and words == line.split()
    args = parse(kind, words)
    assert args.num_samples == 10000 and args.timestep_respacing == "250" and args.use_fp16 is True
    assert isinstance(args.guide_start, int) and isinstance(args.sel_attn_depth, int)


def test_every_preset_parses():
    for path in sorted((REPO / "configs").glob("[!_]*.sh")):
        script, words = preset_command(path.stem)
        parse(script.split("_")[0], words)


def test_bundled_digits_models_load_with_their_preset(tmp_path):
    """The committed digits checkpoints load strictly with configs/digits.sh and run a short
    SAG + classifier-guidance batch (in process)."""
    from guided_diffusion import sampling

    script, words = preset_command("digits")
    args = parse("classifier", [*words, "--num_samples", "4", "--batch_size", "4", "--seed", "3",
                                "--timestep_respacing", "10", "--output_dir", str(tmp_path)])
    assert args.num_classes == 10 and script == "classifier_sample.py"
    sampler = sampling.build_sampler(args, "classifier")
    images, labels = sampling.sample_batch(args, sampler, 0, draws_labels=True)
    assert images.shape == (4, 32, 32, 3) and images.dtype.name == "uint8"
    assert labels.min() >= 0 and labels.max() < 10


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fast_path_flags_in_classifier_sample(tmp_path, ckpts, dtype):
    """--fast_attention (SDPA; fp32: the exact numbers up to rounding) through the script, with
    the classifier gradient wired to overlap SAG's second pass."""
    from guided_diffusion import sampling
    from guided_diffusion.fast_path import ClassifierGradientOverlap, FastSelfAttentionGuidance

    fast = ["--fast_attention", "True", "--dtype", dtype, "--channels_last", "True"]
    args = parse("classifier", flags("classifier", ckpts, tmp_path / "unit", *fast))
    _, _, cond_fn, guidance = sampling.build_sampler(args, "classifier")
    assert isinstance(guidance, FastSelfAttentionGuidance)
    assert isinstance(cond_fn, ClassifierGradientOverlap) and guidance.overlap is cond_fn
    guidance.close()

    ok(run_script("classifier", flags("classifier", ckpts, tmp_path / "exact")))
    ok(run_script("classifier", flags("classifier", ckpts, tmp_path / "fast", *fast)))
    with np.load(npz(tmp_path / "exact")) as exact, np.load(npz(tmp_path / "fast")) as quick:
        assert np.array_equal(exact["arr_1"], quick["arr_1"])
        diff = np.abs(exact["arr_0"].astype(int) - quick["arr_0"].astype(int))
        if dtype == "fp32":  # SDPA vs einsum: rounding, so nearly every pixel is equal
            assert diff.max() <= 8 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
        else:  # bf16 autocast: the same images up to bf16 rounding
            assert diff.mean() < 8, diff.mean()
