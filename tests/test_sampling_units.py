"""Unit tests of the sampling driver's parts: flags, seeds, run-dir rules, npz/PNG writers,
checkpoint diagnostics."""

import json

import numpy as np
import pytest
import torch as th

from guided_diffusion import run_dir, sample_flags, sampler_setup
from guided_diffusion.checkpoint_util import CheckpointError, load_checkpoint
from guided_diffusion.image_io import make_grid, read_png, write_npz_stream, write_png
from sampling_helpers import TINY_MODEL_FLAGS, parse, randomize_


# ------------------------------------------------------------------ flags (SAG.md section 3)

ORIGINAL_DEFAULTS = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
    noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=False, guide_scale=1.5, guide_start=250,
    sel_attn_block="output", sel_attn_depth=2, blur_sigma=9, classifier_guidance=False,
)
CLASSIFIER_DEFAULTS = dict(
    classifier_path="", classifier_scale=1.0, classifier_use_fp16=False, classifier_width=128,
    classifier_depth=2, classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True, classifier_resblock_updown=True, classifier_pool="attention",
)


@pytest.mark.parametrize("kind", ["image", "classifier"])
def test_original_flags_and_defaults(kind):
    args = vars(parse(kind, []))
    expected = dict(ORIGINAL_DEFAULTS, **(CLASSIFIER_DEFAULTS if kind == "classifier" else {}))
    for key, value in expected.items():
        assert args[key] == value and type(args[key]) in (type(value), float), key
    assert args["seed"] is None and args["output_dir"] == "" and args["sag_heads"] == "reference"
    assert ("classifier_path" in args) == (kind == "classifier")


def test_flag_types():
    args = parse("classifier", "--guide_start 25 --sel_attn_depth 8 --blur_sigma 1.5 --use_ddim yes "
                 "--classifier_guidance F --save_grid True".split())
    assert args.guide_start == 25 and isinstance(args.guide_start, int)
    assert args.sel_attn_depth == 8 and args.blur_sigma == 1.5
    assert args.use_ddim is True and args.classifier_guidance is False and args.save_grid == 64
    assert parse("image", ["--save_grid", "16"]).save_grid == 16
    with pytest.raises(SystemExit):
        parse("image", ["--guide_start", "2.5"])


def test_image_sample_help_says_classifier_guidance_is_ignored(capsys):
    with pytest.raises(SystemExit):
        parse("image", ["--help"])
    assert "ignored by image_sample.py" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_guide_scale_must_be_finite(value):
    with pytest.raises(sample_flags.UsageError, match="finite"):
        sample_flags.validate_args(parse("image", [f"--guide_scale={value}"]))


# ------------------------------------------------------------------ seeds


def test_batch_seed_is_fixed_arithmetic():
    assert sampler_setup.batch_seed(0, 0) == sampler_setup.batch_seed(0, 0)
    seeds = {sampler_setup.batch_seed(s, b) for s in range(20) for b in range(200)}
    assert len(seeds) == 4000 and all(0 <= x < 2**63 for x in seeds)
    # torch's CPU generator only keeps the low 32 bits: they must differ too.
    assert len({x & 0xFFFFFFFF for x in seeds}) == 4000
    assert sampler_setup.batch_seed(123, 4) == 9157784838189187668  # pinned: resumable across versions


# ------------------------------------------------------------------ run directory rules


def test_run_dir_resume_and_refusal(tmp_path):
    out = tmp_path / "run"
    args = lambda *flags: vars(parse("image", ["--output_dir", str(out), *flags]))  # noqa: E731
    assert run_dir.check_identity(str(out), "image", args("--seed", "3")) is None
    out.mkdir()
    run_dir.write_identity(str(out), "image", args("--seed", "3"))
    assert json.loads((out / "args.json").read_text())["args"]["seed"] == 3
    assert (out / "config.yaml").exists()
    # Same arguments (harmless ones may differ): resume.
    assert run_dir.check_identity(str(out), "image", args("--seed", "3", "--progress", "False",
                                                          "--force_unlock", "--save_grid", "4")) == 3
    # No --seed: the stored seed is adopted.
    assert run_dir.check_identity(str(out), "image", args()) == 3
    # Other arguments, or the other script: refused, naming the difference.
    with pytest.raises(run_dir.RunDirError, match="guide_scale"):
        run_dir.check_identity(str(out), "image", args("--guide_scale", "2"))
    with pytest.raises(run_dir.RunDirError, match="other arguments"):
        run_dir.check_identity(str(out), "image", args("--seed", "4"))
    with pytest.raises(run_dir.RunDirError, match="image_sample"):
        run_dir.check_identity(str(out), "classifier", vars(parse("classifier", ["--output_dir", str(out)])))


def test_run_dir_with_foreign_samples_is_refused(tmp_path):
    (tmp_path / "samples_10x64x64x3.npz").write_bytes(b"x")
    with pytest.raises(run_dir.RunDirError, match="unknown run"):
        run_dir.check_identity(str(tmp_path), "image", vars(parse("image", ["--output_dir", str(tmp_path)])))


def test_default_output_dir_format():
    import re

    assert re.fullmatch(r"RESULTS/\d{4}_\d\d_\d\d-(0\d|1[012])\d{4}_(AM|PM)", run_dir.default_output_dir())


# ------------------------------------------------------------------ shards and merge


def test_shards_merge_in_global_order_and_cut(tmp_path):
    layout = run_dir.Layout(str(tmp_path), num_samples=7, batch_size=3, image_size=4, with_labels=True)
    (tmp_path / run_dir.SHARD_DIR).mkdir()
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8), np.arange(3) + 10 * b) for b in range(3)]
    for b in (2, 0, 1):  # completion order does not matter
        run_dir.write_shard(layout, b, *batches[b])
    assert layout.finished_batches() == [0, 1, 2] and layout.missing_batches() == []
    run_dir.merge(layout)
    with np.load(layout.final_path) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 4, 4, 3)
        np.testing.assert_array_equal(data["arr_0"], np.concatenate([x for x, _ in batches])[:7])
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 2, 10, 11, 12, 20])
        assert data["arr_1"].dtype == np.int64
    assert run_dir.verify_final(layout) is None
    assert (tmp_path / "samples_7x4x4x3.npz.sha256").read_text().split()[1] == "samples_7x4x4x3.npz"
    np.testing.assert_array_equal(run_dir.first_images(layout, 2), batches[0][0][:2])


def test_npz_stream_matches_savez_and_is_deterministic(tmp_path):
    a = np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)
    members = lambda: [("arr_0", np.uint8, a.shape, [a[:1], a[1:]]), ("arr_1", np.int64, (2,), [np.array([3, 4])])]
    write_npz_stream(str(tmp_path / "x.npz"), members())
    write_npz_stream(str(tmp_path / "y.npz"), members())
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "y.npz").read_bytes()
    with np.load(tmp_path / "x.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], a)
        np.testing.assert_array_equal(data["arr_1"], [3, 4])
    with pytest.raises(ValueError, match="expected"):
        write_npz_stream(str(tmp_path / "z.npz"), [("arr_0", np.uint8, (3, 5, 5, 3), [a])])
    assert not (tmp_path / "z.npz").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "y.npz"]


def test_png_roundtrip_and_grid(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    grid = make_grid(images, pad=1)
    assert grid.shape == (2 * 7 + 1, 3 * 8 + 1, 3)
    np.testing.assert_array_equal(grid[1:7, 9:16], images[1])
    write_png(str(tmp_path / "g.png"), grid)
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(read_png(str(tmp_path / "g.png")), grid)


def test_to_uint8_truncates_like_openai():
    from guided_diffusion.image_io import to_uint8_nhwc

    x = th.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    out = to_uint8_nhwc(x)
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 127, 254, 255, 255]


# ------------------------------------------------------------------ checkpoint diagnostics


def _tiny(flags):
    from guided_diffusion import script_util as su

    args = parse("classifier", TINY_MODEL_FLAGS + flags)
    return su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults()))[0]


@pytest.mark.parametrize("ckpt_flags, hint", [
    (["--class_cond", "False"], "--class_cond False"),
    (["--learn_sigma", "False"], "--learn_sigma False"),
    (["--num_channels", "64"], "--num_channels 64"),
    (["--num_res_blocks", "2"], "--num_res_blocks 2"),
    (["--resblock_updown", "False"], "--resblock_updown"),
    (["--attention_resolutions", "8"], "--attention_resolutions"),
    (["--use_scale_shift_norm", "False"], "--use_scale_shift_norm False"),
])
def test_mismatch_names_the_flag(tmp_path, ckpt_flags, hint):
    path = tmp_path / "ckpt.pt"
    th.save(_tiny(ckpt_flags).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_tiny([]), str(path))
    message = str(info.value)
    assert "\n" not in message and hint in message and "does not match" in message


def test_missing_and_unreadable_checkpoints(tmp_path):
    model = _tiny([])
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read") as info:
        load_checkpoint(model, str(tmp_path / "bad.pt"))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="--model_path"):
        load_checkpoint(model, "")


def test_matching_checkpoint_loads_strictly(tmp_path):
    source = randomize_(_tiny([]))
    th.save(source.state_dict(), tmp_path / "ok.pt")
    with th.device("meta"):
        target = _tiny([])
    load_checkpoint(target, str(tmp_path / "ok.pt"), assign=True)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert th.equal(a, b), k
