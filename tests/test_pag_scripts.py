"""The PAG repository's published command lines through our samplers (a tiny checkpoint with the
ImageNet-256 layer names, so ``--drop_layers input_blocks.14.1 ...`` runs unchanged): one rank,
``mpiexec -n 2`` and a killed-and-resumed run give the same ``.npz``; SEG with classifier
guidance likewise; every PAG / SEG flag error is one line that touches nothing."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from sampling_helpers import (TINY_CLASSIFIER_FLAGS, TINY_MODEL_FLAGS, parse, run_script, save_classifier,
                              save_model, snapshot, start_script)
from test_sampling_scripts import npz, ok, one_error_line, run_in_process

# The ImageNet-256 layout (6 levels, 2 res blocks, attention at the three lowest resolutions) at
# 64x64 and 32 channels: the published drop layers exist (4x4, 2x2, 2x2, 2x2 here).
PAG256_TINY_FLAGS = ("--image_size 64 --num_channels 32 --num_res_blocks 2 --channel_mult 1,1,1,1,1,1 "
                     "--attention_resolutions 8,4,2 --num_head_channels 16 --learn_sigma True "
                     "--resblock_updown True --use_scale_shift_norm True --diffusion_steps 1000 "
                     "--noise_schedule linear --use_fp16 False").split()
# PAG's run/sample_uncond_ddim25.sh, verbatim up to its SAMPLE/MODEL flags (tiny model, few samples,
# 5 instead of 25 DDIM steps: the window [25, 0] still covers every step).
PUBLISHED_UNCOND_DDIM = [
    "--guide_scale", "4.0", "--guidance_strategies", '{"attention_mask_identity":[25,0]}',
    "--drop_layers", "input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1", "middle_block.1",
    "--gpu", "0", "--results_root_dir", "RESULTS", "--results_dir", "uncond_ddim25", "--seed", "0",
    "--save_png", "True", "--timestep_respacing", "ddim5", "--use_ddim", "True",
    "--classifier_guidance", "False", "--classifier_scale", "0.0"]


@pytest.fixture(scope="module")
def pag_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pag_ckpt")
    return dict(
        uncond=str(save_model(root / "uncond.pt", PAG256_TINY_FLAGS + ["--class_cond", "False"])),
        model=str(save_model(root / "model.pt", TINY_MODEL_FLAGS)),
        classifier=str(save_classifier(root / "classifier.pt", TINY_MODEL_FLAGS + TINY_CLASSIFIER_FLAGS)),
    )


def npz64(out, n=4):
    return Path(out) / f"samples_{n}x64x64x3.npz"


def published(pag_ckpts, *extra, gpu_flag=("--gpu", "0")):
    words = list(PUBLISHED_UNCOND_DDIM)
    at = words.index("--gpu")
    words[at:at + 2] = gpu_flag
    return words + PAG256_TINY_FLAGS + ["--class_cond", "False", "--model_path", pag_ckpts["uncond"], *extra]


def test_published_pag_command_one_rank_two_ranks_and_resumed(tmp_path, pag_ckpts):
    extra = ["--batch_size", "1", "--num_samples", "4"]
    for name in ("one", "two", "killed"):  # RESULTS/ is relative to the working directory
        (tmp_path / name).mkdir()
    ok(run_script("classifier", published(pag_ckpts, *extra), cwd=tmp_path / "one"))
    one = tmp_path / "one" / "RESULTS" / "uncond_ddim25"
    ok(run_script("classifier", published(pag_ckpts, *extra, gpu_flag=("--gpu_offset", "0")), nproc=2,
                  cwd=tmp_path / "two"))
    two = tmp_path / "two" / "RESULTS" / "uncond_ddim25"
    assert npz64(one).read_bytes() == npz64(two).read_bytes()
    with np.load(npz64(one)) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (4, 64, 64, 3) and labels.shape == (4,)  # labels drawn, as the original
    pngs = sorted(p.name for p in (one / "png").iterdir())
    assert pngs == [f"{i:06d}_class_{labels[i]}.png" for i in range(4)]
    assert sorted(p.name for p in (two / "png").iterdir()) == pngs
    stored = json.loads((one / "args.json").read_text())["args"]
    assert stored["guidance_strategies"] == {"attention_mask_identity": [25, 0]}
    assert stored["guide_scale"] == 4.0 and stored["output_dir"] == os.path.join("RESULTS", "uncond_ddim25")

    # Killed after two batches, resumed under mpiexec -n 2 (and --gpu_offset instead of --gpu).
    proc = start_script("classifier", published(pag_ckpts, *extra), cwd=tmp_path / "killed")
    killed = tmp_path / "killed" / "RESULTS" / "uncond_ddim25"
    deadline = time.time() + 120
    while len(list((killed / "shards").glob("batch_*.npz"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "shards").glob("batch_*.npz")))
    assert 2 <= done < 4 and not npz64(killed).exists()
    ok(run_script("classifier", published(pag_ckpts, *extra, gpu_flag=("--gpu_offset", "0")), nproc=2,
                  cwd=tmp_path / "killed"))
    assert f"{done} batch(es) already done" in (killed / "log.txt").read_text()
    assert npz64(killed).read_bytes() == npz64(one).read_bytes()


def seg_flags(pag_ckpts, out, *extra):
    return (TINY_MODEL_FLAGS + TINY_CLASSIFIER_FLAGS + [
        "--model_path", pag_ckpts["model"], "--classifier_path", pag_ckpts["classifier"],
        "--classifier_guidance", "True", "--classifier_scale", "2.0", "--output_dir", str(out),
        "--guidance_strategies", '{"seg": [3, 0]}', "--seg_layers", "middle_block.1", "input_blocks.3.1",
        "--seg_blur_sigma", "inf", "--guide_scale", "4.0", "--timestep_respacing", "4",
        "--num_samples", "3", "--batch_size", "1", "--seed", "5"] + list(extra))


def test_seg_ddpm_with_classifier_guidance_two_ranks_match_one(tmp_path, pag_ckpts):
    ok(run_script("classifier", seg_flags(pag_ckpts, tmp_path / "one")))
    ok(run_script("classifier", seg_flags(pag_ckpts, tmp_path / "two", "--visualize", "True"), nproc=2))
    assert npz(tmp_path / "one", 3).read_bytes() == npz(tmp_path / "two", 3).read_bytes()
    pictures = sorted((tmp_path / "two" / "visualize").iterdir())
    assert [p.name for p in pictures] == ["000000.png", "000001.png", "000002.png"]


def test_flags_resolve_scales_layers_and_dirs(pag_ckpts):
    from guided_diffusion import pag_flags

    def resolved(*words):
        args = parse("classifier", list(words))
        pag_flags.validate(args)
        return args

    seg = resolved("--guidance_strategies", '{"seg": [25, 0]}', "--seg_scale", "3.0")
    assert seg.guide_scale == 4.0 and pag_flags.layers(seg) == ["middle_block.1"] and seg.seg_blur_sigma == np.inf
    assert resolved("--guidance_strategies", '{"seg":[9,0]}').guide_scale == 4.0  # SEG/PAG default
    assert resolved("--guidance_strategies", '{"seg":[9,0]}', "--guide_scale", "1.5").guide_scale == 1.5
    assert resolved().guide_scale == 1.5  # SAG's default is unchanged
    pag = resolved("--guidance_strategies", '{"attention_mask_identity":[25,0]}', "--results_dir", "x")
    assert pag_flags.layers(pag) == ["input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1",
                                     "middle_block.1"]
    assert pag.output_dir == os.path.join("RESULTS", "x")
    assert pag_flags.cuda_index(pag) is None
    assert pag_flags.cuda_index(resolved("--gpu", "3"))(1, 4) == 3
    assert pag_flags.cuda_index(resolved("--gpu_offset", "2"))(1, 4) == 3
    with pytest.raises(SystemExit, match="CUDA device 5 does not exist"):
        pag_flags.cuda_index(resolved("--gpu_offset", "4"))(1, 4)


def test_pag_flag_errors_are_one_line_and_write_nothing(tmp_path, pag_ckpts, capsys):
    fresh = tmp_path / "fresh"
    base = TINY_MODEL_FLAGS + ["--model_path", pag_ckpts["model"], "--output_dir", str(fresh),
                               "--timestep_respacing", "2", "--num_samples", "1"]
    layers = ["--drop_layers", "middle_block.1"]
    cases = [
        (['--guidance_strategies', '{"attention_mask_identity":[25,0]}', "--guide_start", "100", *layers],
         ["SAG and PAG/SEG requested in one run", "--guide_start 100"]),
        (['--guidance_strategies', '{"sag":[2,0],"attention_mask_identity":[2,0]}'],
         ["SAG and PAG/SEG requested in one run"]),
        (['--guidance_strategies', '{"attention_mask_identity":[2,0],"seg":[2,0]}'], ["two strategies at once"]),
        (['--guidance_strategies', '{"attention_mask_identity":[25,0'], ["not valid JSON"]),
        (['--guidance_strategies', '{"attention_mask_identity":[25,0]}', "--drop_layers", "input_blocks.14.1"],
         ["input_blocks.14.1", "not an attention block", "middle_block.1 (8x8)", "input_blocks.3.1 (16x16)"]),
        (['--guidance_strategies', '{"seg":[2,0]}', "--seg_layers", "middle_block.0"],
         ["--seg_layers middle_block.0: not an attention block"]),
        (['--guidance_strategies', '{"seg":[2,0]}', "--guide_scale", "inf", *layers], ["finite"]),
        (['--guidance_strategies', '{"attention_mask_identity":[2,0]}', "--guide_scale", "nan", *layers],
         ["finite"]),
        (['--guidance_strategies', '{"seg":[2,0]}', "--seg_blur_sigma", "-1"], ["positive"]),
        (['--guidance_strategies', '{"attention_mask":[2,0]}', *layers], ["masks every logit"]),
        (layers, ["--drop_layers need --guidance_strategies"]),
        (['--guidance_strategies', '{"seg":[2,0]}', "--guide_scale", "2", "--seg_scale", "3"], ["disagree"]),
        (["--results_dir", "r"], ["both choose the run directory"]),
    ]
    for extra, needles in cases:
        one_error_line(run_in_process("image", base + extra, capsys), *needles)
    assert not fresh.exists() and not (Path.cwd() / "RESULTS" / "r").exists()
    # Under mpiexec: still one line.
    one_error_line(run_script("image", base + ['--guidance_strategies', '{"attention_mask_identity":[2,0]'],
                              nproc=2), "not valid JSON")
    assert not fresh.exists()


def test_resume_accepts_other_runner_flags(tmp_path, pag_ckpts, capsys):
    """--results_dir vs --output_dir, --gpu, --save_png change no sample: a finished run is
    recognised; another PAG window is refused."""
    out = tmp_path / "RESULTS" / "r"

    def flags(window, *extra):
        return TINY_MODEL_FLAGS + [
            "--model_path", pag_ckpts["model"], "--timestep_respacing", "2", "--num_samples", "1",
            "--guidance_strategies", json.dumps({"attention_mask_identity": window}),
            "--drop_layers", "middle_block.1", "--seed", "1", *extra]

    ok(run_script("image", flags([1, 0], "--results_root_dir", str(tmp_path / "RESULTS"), "--results_dir", "r")))
    before = snapshot(out)
    from guided_diffusion.sampling import main

    main("image", flags([1, 0], "--output_dir", str(out), "--gpu", "0", "--save_png", "True"))
    assert "already complete" in capsys.readouterr().out and snapshot(out) == before
    one_error_line(run_in_process("image", flags([0, 0], "--output_dir", str(out)), capsys), "other arguments",
                   "guidance_strategies")
    assert snapshot(out) == before


# ------------------------------------------------------------------ presets (configs/imagenet256_*_pag_*)

PAG_MODEL_FLAGS = ("--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True "
                   "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
                   "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
PAG_COND_FLAGS = {
    "uncond": "--class_cond False --model_path models/256x256_diffusion_uncond.pt",
    "cond": "--class_cond True --model_path models/256x256_diffusion.pt --classifier_path models/256x256_classifier.pt",
}


def pag_published_line(cond, sampler, scale):
    """A run/sample_*.sh command of the PAG repository (its layout; --seed 0 is its default)."""
    window, respacing = (25, "ddim25 --use_ddim True") if sampler == "ddim25" else (250, "250 --use_ddim False")
    return (f'--guide_scale {scale} --guidance_strategies {{"attention_mask_identity":[{window},0]}} '
            "--drop_layers input_blocks.14.1 input_blocks.16.1 input_blocks.17.1 middle_block.1 --gpu 0 "
            "--results_root_dir RESULTS --results_dir x --save_png True --seed 0 --batch_size 5 --num_samples 5000 "
            f"--timestep_respacing {respacing} --classifier_guidance False --classifier_scale 0.0 "
            f"{PAG_MODEL_FLAGS} {PAG_COND_FLAGS[cond]}").split()


@pytest.mark.parametrize("cond", ["uncond", "cond"])
@pytest.mark.parametrize("sampler, scale, suffix", [("ddim25", "4.0", ""), ("ddim25", "1.0", "_baseline"),
                                                    ("ddpm250", "4.0", "")])
def test_pag_presets_are_the_published_runs(cond, sampler, scale, suffix):
    from guided_diffusion import pag_flags
    from test_sampling_scripts import preset_command

    script, words = preset_command(f"imagenet256_{cond}_pag_{sampler}{suffix}")
    assert script == "classifier_sample.py"
    ours, theirs = parse("classifier", words), parse("classifier", pag_published_line(cond, sampler, scale))
    for args in (ours, theirs):
        pag_flags.validate(args)
    ignored = set(pag_flags.HARMLESS_ARGS) | {"output_dir"}
    assert {k: v for k, v in vars(ours).items() if k not in ignored} == \
        {k: v for k, v in vars(theirs).items() if k not in ignored}
    assert ours.output_dir == os.path.join("RESULTS", f"{cond}_pag_{sampler}{suffix}")


def test_seg_presets_parse():
    from guided_diffusion import pag_flags
    from test_sampling_scripts import preset_command

    for cond in ("uncond", "cond"):
        _, words = preset_command(f"imagenet256_{cond}_seg_ddim25")
        args = parse("classifier", words)
        pag_flags.validate(args)
        assert args.guidance_strategies == {"seg": [25, 0]} and args.guide_scale == 4.0
        assert pag_flags.layers(args) == ["middle_block.1"] and args.seg_blur_sigma == float("inf")
