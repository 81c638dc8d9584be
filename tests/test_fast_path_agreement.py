"""Fast path vs exact path, step by step (guided_diffusion/path_agreement.py and
scripts/compare_fast_path.py), on the bundled digits model (trained weights, so the attention
maps and SAG masks are real ones).

On CPU: SDPA fp32 and bf16 autocast. On a CUDA machine (skipped elsewhere) also the GPU paths
of issue #6: OpenAI's fp16 torso, fp16 / bf16 autocast, TF32 + channels_last + torch.compile,
and CUDA graphs, each within its format's tolerance and with >= 99% equal SAG masks over the
trajectory; and the classifier-gradient overlap on a real side stream.
"""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

from guided_diffusion.checkpoint_util import load_checkpoint
from guided_diffusion.fast_path import (
    FastPerturbedAttentionGuidance,
    FastSelfAttentionGuidance,
    _tf32_state,
    prepare_model,
    tf32_enabled,
    tf32_mode,
)
from guided_diffusion.pag import PerturbedAttentionGuidance
from guided_diffusion.path_agreement import compare_guided_steps, compare_sag_steps, summarize
from guided_diffusion.sag import SelfAttentionGuidance
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compare_fast_path.py"
# configs/digits.sh (MODEL_FLAGS, SAG_FLAGS); test_sampling_scripts checks the preset loads.
DIGITS = dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,1,2",
              attention_resolutions="16,8", num_heads=4, class_cond=True, num_classes=10,
              learn_sigma=True, diffusion_steps=1000, noise_schedule="cosine", resblock_updown=False,
              use_scale_shift_norm=True, dropout=0.0)
DIGITS_SAG = dict(guide_scale=1.5, sel_attn_block="output", sel_attn_depth=2, blur_sigma=3.0)
needs_cuda = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA GPU")


def cli_flags(**overrides):
    flags = dict(DIGITS, **DIGITS_SAG, model_path=str(REPO / "models" / "digits32_diffusion.pt"))
    flags.update(overrides)
    return [word for key, value in flags.items() for word in (f"--{key}", str(value))]


def run_compare(*extra, timeout=600):
    cmd = [sys.executable, str(SCRIPT), *cli_flags(), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def table_rows(stdout):
    """{path: [cells]} of the printed table."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def digits_model(respacing="ddim10"):
    flags = model_and_diffusion_defaults()
    flags.update(DIGITS, timestep_respacing=respacing)
    model, diffusion = create_model_and_diffusion(**flags)
    load_checkpoint(model, REPO / "models" / "digits32_diffusion.pt")
    return model.eval(), diffusion


def sag(model, cls=SelfAttentionGuidance, **overrides):
    kwargs = dict(DIGITS_SAG, guide_start=10 ** 9, keep_intermediates=True)
    kwargs.update(overrides)
    return cls(model, **kwargs)


def start(batch=4, seed=0):
    gen = th.Generator().manual_seed(seed)
    return th.randn(batch, 3, 32, 32, generator=gen), {"y": th.randint(0, 10, (batch,), generator=gen)}


# ---------------------------------------------------------------------------------- CPU


def test_identical_path_agrees_exactly_and_a_different_one_does_not():
    """The measure can fail: a copy of the network agrees perfectly; a network with perturbed
    weights, or a guidance probing another block, is caught."""
    model, diffusion = digits_model()
    same = copy.deepcopy(model)
    noisy = copy.deepcopy(model)
    gen = th.Generator().manual_seed(4)
    with th.no_grad():
        for param in noisy.parameters():
            param.add_(1e-2 * param.abs().mean() * th.randn(param.shape, generator=gen))
    other_block = copy.deepcopy(model)
    noise, kwargs = start()
    paths = {"same": (same, sag(same)), "noisy": (noisy, sag(noisy)),
             "other_block": (other_block, sag(other_block, sel_attn_depth=1))}
    rows = compare_sag_steps(diffusion, (model, sag(model)), paths, noise, kwargs, steps=4)
    assert [r["step"] for r in rows["same"]] == [9, 8, 7, 6]
    same, noisy, other = (summarize(rows[k]) for k in ("same", "noisy", "other_block"))
    assert same["min_mask_agreement"] == 1.0 and same["max_guided_eps_rel_err"] == 0.0
    assert noisy["max_eps_rel_err"] > 1e-3
    assert other["max_eps_rel_err"] == 0.0 and other["mean_mask_agreement"] < 0.95
    assert other["max_guided_eps_rel_err"] > 1e-3


def test_guidance_must_keep_intermediates():
    model, diffusion = digits_model()
    fast = copy.deepcopy(model)
    noise, kwargs = start()
    with pytest.raises(ValueError, match="keep_intermediates"):
        compare_sag_steps(diffusion, (model, sag(model)), {"f": (fast, sag(fast, keep_intermediates=False))},
                          noise, kwargs, steps=1)
    with pytest.raises(ValueError, match="SAG was not active at step 9"):
        compare_sag_steps(diffusion, (model, sag(model, guide_start=5)), {"f": (fast, sag(fast))},
                          noise, kwargs, steps=1)


def test_cpu_paths_within_tolerance_on_the_bundled_model():
    """SDPA fp32 and bf16 autocast (with channels_last) through the script, with --check."""
    proc = run_compare("--paths", "fp32,bf16+nhwc", "--steps", "6", "--batch_size", "4",
                       "--device", "cpu", "--check", "True")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert list(rows) == ["fp32", "bf16+nhwc"]
    assert all(cells[-1] == "ok" for cells in rows.values())
    assert rows["fp32"][2] == "100.00% / 100.00%"


def test_fp32_path_is_the_exact_numbers():
    model, diffusion = digits_model()
    fast = prepare_model(copy.deepcopy(model), fast_attention=True)
    noise, kwargs = start()
    rows = compare_sag_steps(diffusion, (model, sag(model)),
                             {"fp32": (fast, sag(fast, cls=FastSelfAttentionGuidance))}, noise, kwargs)
    s = summarize(rows["fp32"])
    assert s["steps"] == 10 and s["min_mask_agreement"] == 1.0 and s["max_eps_rel_err"] < 1e-5


def test_compiled_forward_honours_a_probe_attached_after_compilation(monkeypatch):
    """--compile traces the UNet at its first call; SAG's probe, attached after a compiled call
    (a plain pass first), must still capture: prepare_model makes dynamo guard on module hooks.
    Dynamo's tracing and guards are under test, so the quick aot_eager backend stands in for
    inductor (whose generated kernels the GPU run of this file checks)."""
    import functools

    monkeypatch.setattr(th, "compile", functools.partial(th.compile, backend="aot_eager"))
    model, diffusion = digits_model()
    fast = prepare_model(copy.deepcopy(model), fast_attention=True, compile=True, channels_last=True)
    noise, kwargs = start()
    try:
        with th.no_grad():
            fast(noise, th.full((4,), 9), **kwargs)  # compiled without any hook
        rows = compare_sag_steps(diffusion, (model, sag(model)),
                                 {"compiled": (fast, sag(fast, cls=FastSelfAttentionGuidance))},
                                 noise, kwargs, steps=3)
    finally:
        th._dynamo.reset()
    s = summarize(rows["compiled"])
    assert s["min_mask_agreement"] == 1.0 and s["max_eps_rel_err"] < 1e-5


def test_verdict_on_a_miss():
    spec = importlib.util.spec_from_file_location("compare_fast_path", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(cli_flags())
    good = dict(steps=3, min_mask_agreement=0.995, mean_mask_agreement=0.999, max_eps_rel_err=1e-2,
                max_eps_max_rel_err=2e-2, max_second_eps_rel_err=1e-2, max_guided_eps_rel_err=1e-2)
    results = {"bf16": ("bf16", good),
               "fp16": ("fp16", dict(good)),  # 1e-2 > 16 * 2^-11
               "bf16+nhwc": ("bf16", dict(good, mean_mask_agreement=0.98))}
    text, _, failed = script.report(results, args, th.device("cpu"))
    assert failed == ["fp16", "bf16+nhwc"]
    assert [cells[-1] for cells in table_rows(text).values()] == ["ok", "FAIL", "FAIL"]


@pytest.mark.parametrize("extra,message", [
    (["--paths", "bf17"], "cannot read 'bf17'"),
    (["--paths", "bf16+turbo"], "cannot read 'bf16+turbo'"),
    (["--paths", "fp16+nhwc+nhwc"], "cannot read"),
    (["--num_channels", "64"], "does not match the flags"),
    (["--sel_attn_block", "middle", "--attention_resolutions", "32"], "does not match the flags"),
    (["--guide_scale", "1"], "turns SAG off"),
    (["--sel_attn_block", "input", "--sel_attn_depth", "0"], "valid (block depth) choices"),
])
def test_bad_input_is_a_one_line_error(extra, message):
    proc = run_compare(*extra, "--device", "cpu", "--steps", "1", "--batch_size", "1", timeout=120)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_model_path_is_a_clear_error(tmp_path):
    proc = run_compare("--model_path", str(tmp_path / "nope.pt"), timeout=120)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_tf32_mode_restores_the_exact_settings():
    before = _tf32_state()
    with tf32_mode(True):
        assert tf32_enabled()
        with tf32_mode(False):
            assert not tf32_enabled()
        assert tf32_enabled()
    assert _tf32_state() == before


def test_prepare_model_forbids_tf32_unless_allowed():
    """PyTorch allows TF32 in cuDNN convolutions by default; the exact path must not use it."""
    model, _ = digits_model()
    with tf32_mode(True):
        prepare_model(model)
        assert _tf32_state() in (("ieee", "ieee"), (False, False))  # (older torch: booleans)
        prepare_model(copy.deepcopy(model), allow_tf32=True)
        assert tf32_enabled()


# ---------------------------------------------------------------------------------- PAG / SEG

PAG_LAYERS = ["input_blocks.7.1", "middle_block.1"]


def pag_guidance(model, cls=PerturbedAttentionGuidance, **overrides):
    kwargs = dict(guide_scale=4.0, drop_layers=PAG_LAYERS, keep_intermediates=True)
    kwargs.update(overrides)
    return cls(model, **kwargs)


def test_pag_and_seg_paths_step_by_step():
    """PAG / SEG have no mask: the figures are both passes' eps; the SDPA path is the exact
    numbers; a path perturbing another block is caught by its second pass alone."""
    model, diffusion = digits_model()
    fast = prepare_model(copy.deepcopy(model), fast_attention=True)
    noise, kwargs = start()
    for settings in (dict(), dict(strategy="seg", drop_layers=["middle_block.1"])):
        exact = (model, pag_guidance(model, **settings))
        paths = {"fp32": (fast, pag_guidance(fast, FastPerturbedAttentionGuidance, **settings)),
                 "other_block": (model, pag_guidance(model, **dict(settings, drop_layers=["output_blocks.2.1"])))}
        rows = compare_guided_steps(diffusion, exact, paths, noise, kwargs, steps=3)
        fp32, other = summarize(rows["fp32"]), summarize(rows["other_block"])
        assert fp32["mean_mask_agreement"] is None and rows["fp32"][0]["mask_agreement"] is None
        assert max(fp32["max_eps_rel_err"], fp32["max_second_eps_rel_err"], fp32["max_guided_eps_rel_err"]) < 1e-5
        assert other["max_eps_rel_err"] == 0.0 and other["max_second_eps_rel_err"] > 1e-3
    with pytest.raises(ValueError, match="runs sag, the exact path pag"):
        compare_guided_steps(diffusion, exact, {"sag": (fast, sag(fast))}, noise, kwargs, steps=1)
    with pytest.raises(ValueError, match="guidance was not active at step 9"):
        compare_guided_steps(diffusion, exact, {"f": (fast, pag_guidance(fast, guidance_window=(5, 0)))},
                             noise, kwargs, steps=1)


def load_compare_script():
    spec = importlib.util.spec_from_file_location("compare_fast_path", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def digits_pag_flags(*extra):
    """The digits model's flags without the SAG ones (which PAG / SEG refuse), then ``extra``."""
    flags = dict(DIGITS, model_path=str(REPO / "models" / "digits32_diffusion.pt"))
    return [word for key, value in flags.items() for word in (f"--{key}", str(value))] + list(extra)


def test_compare_script_checks_seg_and_pag(capsys):
    """In process (no interpreter start-up): SEG through the script with --check, PAG's errors."""
    script = load_compare_script()
    script.main(digits_pag_flags("--guidance_strategies", '{"seg": [9, 0]}', "--seg_layers", "middle_block.1",
                                 "--timestep_respacing", "ddim10", "--paths", "fp32", "--steps", "2",
                                 "--batch_size", "2", "--device", "cpu", "--check", "True"))
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ["fp32"] and rows["fp32"][2] == "- (no mask)" and rows["fp32"][-1] == "ok"
    assert "SEG (seg) on every step (scale 4, sigma inf, layers middle_block.1)" in out
    for extra, message in [
        (["--guide_scale", "1"], "turns PAG / SEG off"),
        (["--blur_sigma", "3"], "SAG and PAG/SEG requested in one run"),
        (["--drop_layers", "middle_block.0"], "valid names"),
    ]:
        with pytest.raises(SystemExit, match=message):
            script.main(digits_pag_flags("--guidance_strategies", '{"attention_mask_identity": [9, 0]}',
                                         "--device", "cpu", "--steps", "1", "--batch_size", "1", *extra))


# ---------------------------------------------------------------------------------- GPU


@needs_cuda
def test_gpu_paths_within_tolerance_on_the_bundled_model():
    """Issue #6's numerics: every GPU path (the script's CUDA default: OpenAI's fp16 torso, SDPA
    fp32, fp16 / bf16 autocast, TF32 + NHWC, compiled, CUDA graphs) against exact fp32 (TF32 off),
    25 DDIM steps, batch 16."""
    proc = run_compare("--batch_size", "16", "--device", "cuda", "--check", "True")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = table_rows(proc.stdout)
    assert len(rows) == 7 and {"bf16+tf32+nhwc+compile", "bf16+tf32+nhwc+cudagraphs"} <= set(rows)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_classifier_overlap_gives_the_same_samples_with_the_bundled_models(sampler, device):
    """On CUDA the classifier gradient runs on a side stream, concurrently with SAG's second
    pass; the samples must not change (on CPU it runs in order: the harness itself)."""
    from guided_diffusion.fast_path import ClassifierGradientOverlap, pair_overlap
    from guided_diffusion.sampling import classifier_cond_fn
    from guided_diffusion.script_util import classifier_defaults, create_classifier

    model, diffusion = digits_model(respacing="ddim6" if sampler == "ddim" else "6")
    model = prepare_model(model.to(device), fast_attention=True, dtype="bf16", channels_last=True)
    flags = classifier_defaults()
    flags.update(image_size=32, classifier_width=32, classifier_depth=2,
                 classifier_attention_resolutions="16,8", classifier_pool="attention", num_classes=10)
    classifier = create_classifier(**flags)
    load_checkpoint(classifier, REPO / "models" / "digits32_classifier.pt", "classifier")
    classifier = prepare_model(classifier.to(device).eval(), fast_attention=True, dtype="bf16", channels_last=True)
    cond_fn = classifier_cond_fn(classifier, 1.0)
    noise, kwargs = start(batch=8)
    noise, kwargs = noise.to(device), {"y": kwargs["y"].to(device)}
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    samples = []
    with sag(model, cls=FastSelfAttentionGuidance, keep_intermediates=False) as guidance:
        for cond in (cond_fn, ClassifierGradientOverlap(cond_fn)):
            pair_overlap(guidance, cond)
            th.manual_seed(3)
            samples.append(loop(model, noise.shape, noise=noise.clone(), model_kwargs=kwargs,
                                cond_fn=cond, guidance=guidance))
    assert (samples[0] - samples[1]).abs().max().item() < 1e-4
