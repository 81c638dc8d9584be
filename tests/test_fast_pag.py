"""The fast path of PAG and SEG (fast_path.FastPerturbedAttention / FastPerturbedAttentionGuidance)
against the exact path and the original's golden vectors, on CPU: the shortcuts (identity block
= v, no attention computed; SEG sigma = inf = one query row per head), the original's RNG draws
kept (seeded DDPM samples equal), no host-device sync per step, one compiled graph per pass."""

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F

from golden_sag import GoldenCase
from guided_diffusion import fast_attention
from guided_diffusion.fast_path import (
    ClassifierGradientOverlap,
    FastPerturbedAttention,
    FastPerturbedAttentionGuidance,
    pag_class,
    pair_overlap,
    prepare_model,
)
from guided_diffusion.pag import MASK, PAG, SEG, PerturbedAttention, PerturbedAttentionGuidance
from guided_diffusion.unet import qkv_heads
from tiny_models import tiny_model_and_diffusion

LAYERS = ["input_blocks.5.1", "input_blocks.7.1", "middle_block.1"]  # 16x16, 8x8, 8x8
SETTINGS = {  # strategy settings the fast op handles differently
    "pag": dict(strategy=PAG),
    "seg_inf": dict(strategy=SEG, seg_sigma=math.inf),
    "seg_2": dict(strategy=SEG, seg_sigma=2.0),
    "pag_mask_0.5": dict(strategy=PAG, noise_scale=0.5),
}
Y = th.tensor([3, 7])


def models(respacing="4", **overrides):
    """The tiny UNet (attention at 16x16 and 8x8) and an SDPA copy of it (the fast path)."""
    model, diffusion = tiny_model_and_diffusion(attention_resolutions="16,8", timestep_respacing=respacing,
                                                **overrides)
    return model, prepare_model(copy.deepcopy(model), fast_attention=True), diffusion


def random_qkv(heads=4, ch=8, side=8, batch=2, seed=0):
    gen = th.Generator().manual_seed(seed)
    return 2 * th.randn(batch, 3 * heads * ch, side * side, generator=gen)


def op_pair(settings, new_order, side):
    kwargs = dict(settings)
    strategy = kwargs.pop("strategy")
    exact = PerturbedAttention(4, new_order, strategy, **kwargs)
    fast = FastPerturbedAttention(4, new_order, strategy, **kwargs)
    exact.grid = fast.grid = (side, side)
    return exact, fast


# ---------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("name", list(SETTINGS) + ["mask_0.97"])
def test_fast_op_equals_the_exact_op(name, new_order):
    """Same output (same draws: same seed); PAG's identity map bit for bit; rows of
    attention_mask without any logit are NaN in both (noise_scale 0.97 on 64 tokens: many)."""
    settings = SETTINGS.get(name, dict(strategy=MASK, noise_scale=0.97))
    exact, fast = op_pair(settings, new_order, side=8)
    qkv = random_qkv()
    th.manual_seed(3)
    want = exact(qkv)
    th.manual_seed(3)
    got = fast(qkv)
    assert got.shape == want.shape == (2, 32, 64)
    if name == "pag":
        assert th.equal(got, want)
    th.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    if name == "mask_0.97":
        assert 0 < th.isnan(want).float().mean() < 1


def test_identity_op_returns_v_and_draws_nothing():
    """The fast identity op slices v out of qkv (per head, in each qkv order) and leaves the random
    stream alone (its guidance makes the original's draws before the pass)."""
    for new_order in (False, True):
        _, fast = op_pair(SETTINGS["pag"], new_order, side=8)
        qkv = random_qkv()
        th.manual_seed(0)
        out = fast(qkv)
        after = th.rand(3)
        th.manual_seed(0)
        assert th.equal(after, th.rand(3))
        v = qkv_heads(qkv, 4, new_order)[2]
        assert th.equal(out, v.reshape(2, 32, 64))


def test_mean_query_attention_is_one_row_per_head_broadcast():
    qkv = random_qkv(side=16)
    exact, fast = op_pair(SETTINGS["seg_inf"], False, side=16)
    out = fast(qkv)
    assert out.stride(-1) == 0  # one row per (sample, head), broadcast over the 256 tokens
    th.testing.assert_close(out, exact(qkv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pag", "seg_inf", "seg_2"])
def test_joint_batch_perturbs_only_the_second_half(name):
    """``perturb_from``: both passes as one batch of 2B; the first half is the plain attention."""
    _, fast = op_pair(SETTINGS[name], False, side=8)
    qkv = random_qkv(batch=3)
    joint = FastPerturbedAttention(4, False, fast.strategy, seg_sigma=fast.seg_sigma, perturb_from=3)
    joint.grid = fast.grid
    out = joint(th.cat([qkv, qkv]))
    plain = fast_attention.SDPAAttention(4)(qkv)
    th.testing.assert_close(out[:3], plain, rtol=0, atol=0)
    th.testing.assert_close(out[3:], fast(qkv), rtol=1e-6, atol=1e-6)


def test_seg_fast_op_refuses_a_non_square_grid():
    _, fast = op_pair(SETTINGS["seg_inf"], False, side=8)
    fast.grid = (4, 16)
    with pytest.raises(ValueError, match="square 2-D token grid"):
        fast(random_qkv())


# ---------------------------------------------------------------------------------- the guided steps


def trajectory(model, diffusion, cls, sampler, settings, seed=5, **extra):
    guidance = cls(model, guide_scale=3.0, drop_layers=LAYERS, keep_intermediates=True, **settings, **extra)
    loop = getattr(diffusion, f"{sampler}_sample_loop_progressive")
    noise = th.randn(2, 3, 32, 32, generator=th.Generator().manual_seed(1))
    th.manual_seed(seed)
    with th.no_grad():
        return list(loop(model, noise.shape, noise=noise, model_kwargs={"y": Y}, guidance=guidance))


@pytest.mark.parametrize("name,sampler", [("pag", "p"), ("pag", "ddim"), ("seg_inf", "p"),
                                          ("seg_2", "ddim"), ("pag_mask_0.5", "p")])
def test_fast_guidance_follows_the_exact_path(name, sampler):
    """The fast path (SDPA model, fast guidance) vs the exact path, every step: guided eps and the
    samples within float32 rounding. Seeded DDPM included: the fast path consumes the original's
    mask draws like the exact one, so the step noise is the same."""
    model, fast_model, diffusion = models()
    exact = trajectory(model, diffusion, PerturbedAttentionGuidance, sampler, SETTINGS[name])
    fast = trajectory(fast_model, diffusion, FastPerturbedAttentionGuidance, sampler, SETTINGS[name])
    assert len(exact) == len(fast) == 4 and all("pag" in out for out in fast)
    for a, b in zip(exact, fast):
        th.testing.assert_close(b["pag"]["guided_eps"], a["pag"]["guided_eps"], rtol=1e-4, atol=1e-4)
        th.testing.assert_close(b["sample"], a["sample"], rtol=1e-4, atol=1e-4)


def test_skipping_the_draws_changes_ddpm_samples_on_both_paths_alike():
    """reproduce_rng=False skips the (unused) draws on both paths: same samples as each other, and
    not those of the default (the draws shift the DDPM noise): the check above can fail."""
    model, fast_model, diffusion = models(respacing="3")
    skip = dict(SETTINGS["pag"], reproduce_rng=False)
    exact = trajectory(model, diffusion, PerturbedAttentionGuidance, "p", skip)[-1]["sample"]
    fast = trajectory(fast_model, diffusion, FastPerturbedAttentionGuidance, "p", skip)[-1]["sample"]
    default = trajectory(fast_model, diffusion, FastPerturbedAttentionGuidance, "p", SETTINGS["pag"])
    th.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)
    assert (default[-1]["sample"] - fast).abs().max() > 1e-2


def test_fast_pag_makes_the_exact_draws_in_forward_order(monkeypatch):
    """Layers given in any order; one random layer per step with drop_layer_randomly."""
    model, fast_model, diffusion = models(respacing="3")
    shapes = []
    real_rand = th.rand
    monkeypatch.setattr(th, "rand", lambda *a, **k: shapes.append(tuple(a[0])) or real_rand(*a, **k))
    x, t = th.randn(2, 3, 32, 32), th.tensor([2, 2])
    draws = {}
    for key, m, cls in (("exact", model, PerturbedAttentionGuidance),
                        ("fast", fast_model, FastPerturbedAttentionGuidance)):
        shapes.clear()
        guidance = cls(m, drop_layers=LAYERS[::-1])
        with th.no_grad():
            diffusion.p_sample(m, x, t, model_kwargs={"y": Y}, guidance=guidance)
        draws[key] = list(shapes)
    assert draws["fast"] == draws["exact"] == [(8, 256, 256), (8, 64, 64), (8, 64, 64)]
    shapes.clear()
    guidance = FastPerturbedAttentionGuidance(fast_model, drop_layers=LAYERS, drop_layer_randomly=True)
    with th.no_grad():
        diffusion.p_sample(fast_model, x, t, model_kwargs={"y": Y}, guidance=guidance)
    assert len(shapes) == 1 and shapes[0] in [(8, 256, 256), (8, 64, 64)]


def test_fast_guidance_reproduces_the_originals_ddpm_step(golden_dir):
    """The golden DDPM step of the original PAG code (its three rand masks drawn before the step
    noise) through the fast path: SDPA model, fast guidance."""
    case = GoldenCase(golden_dir, "ddpm_step_pag", "pag")
    model, diffusion = case.build()
    model = prepare_model(model, fast_attention=True)
    cli = case.meta["cli"]
    guidance = FastPerturbedAttentionGuidance(
        model, guide_scale=cli["guide_scale"], drop_layers=cli["drop_layers"],
        guidance_window=cli["guidance_strategies"]["attention_mask_identity"])
    th.manual_seed(case.meta["seed"])
    with th.no_grad():
        out = diffusion.p_sample(model, case.input("x"), case.input("t"), model_kwargs={"y": case.input("y")},
                                 guidance=guidance)
    np.testing.assert_allclose(out["sample"].numpy(), case.expected("sample"), rtol=0, atol=1e-4)


def test_fast_guidance_reproduces_the_seg_golden_forward(golden_dir):
    """SEG sigma = inf and finite sigmas through the fast ops, against the official blur's outputs."""
    case = GoldenCase(golden_dir, "unet_forward_seg", "seg")
    model, _ = case.build()
    model = prepare_model(model, fast_attention=True)
    for key, sigma in case.meta["sigmas"].items():
        guidance = FastPerturbedAttentionGuidance(model, strategy=SEG, seg_sigma=float(sigma),
                                                  drop_layers=["input_blocks.7.1", "input_blocks.8.1",
                                                               "middle_block.1"])
        with th.no_grad(), guidance.perturbation():
            out = model(case.input("x"), case.input("t"), case.input("y"))
        np.testing.assert_allclose(out.numpy(), case.expected(f"output_seg_{key}"), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- work not done


def test_identity_blocks_compute_no_attention_and_seg_one_query_row(monkeypatch):
    """Count the attention calls of one guided step: the perturbed pass runs SDPA in every block
    but the identity ones (and never the exact op); SEG sigma = inf attends one query per head."""
    model, fast_model, diffusion = models()
    n_blocks = 11
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        calls.append(q.shape[-2])
        return real_sdpa(q, k, v, *args, **kwargs)

    def no_exact_attention(*args, **kwargs):
        raise AssertionError("the exact attention ran on the fast path")

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr("guided_diffusion.pag.attend", no_exact_attention)
    x, t = th.randn(2, 3, 32, 32), th.tensor([2, 2])
    for name, expected in (("pag", n_blocks + n_blocks - 3), ("seg_inf", 2 * n_blocks)):
        calls.clear()
        guidance = FastPerturbedAttentionGuidance(fast_model, drop_layers=LAYERS, **SETTINGS[name])
        with th.no_grad():
            diffusion.ddim_sample(fast_model, x, t, model_kwargs={"y": Y}, guidance=guidance)
        assert len(calls) == expected, (name, calls)
        if name == "seg_inf":
            assert sorted(calls).count(1) == 3  # the three SEG blocks: one query row


@pytest.mark.parametrize("name,sampler", [("pag", "ddpm"), ("seg_inf", "ddim"), ("seg_2", "ddpm")])
def test_fast_pag_loop_reads_no_device_value(name, sampler):
    """The guided loop (window on part of the steps, classifier guidance) on the meta device,
    where any host read of a tensor value raises: no host-device synchronisation per step."""
    from guided_diffusion.sampling import classifier_cond_fn
    from guided_diffusion.script_util import classifier_defaults, create_classifier

    model, _ = tiny_model_and_diffusion(attention_resolutions="16,8")
    _, diffusion = tiny_model_and_diffusion(attention_resolutions="16,8",
                                            timestep_respacing="ddim6" if sampler == "ddim" else "6")
    flags = classifier_defaults()
    flags.update(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="16,8")
    meta = th.device("meta")
    model = prepare_model(model.to(meta), fast_attention=True)
    cond_fn = ClassifierGradientOverlap(classifier_cond_fn(create_classifier(**flags).eval().to(meta), 1.0))
    guidance = FastPerturbedAttentionGuidance(model, drop_layers=LAYERS, guidance_window=(4, 1),
                                              overlap=cond_fn, **SETTINGS[name])
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    out = loop(model, (2, 3, 32, 32), noise=th.empty(2, 3, 32, 32, device=meta),
               model_kwargs={"y": th.zeros(2, dtype=th.long, device=meta)}, cond_fn=cond_fn, device=meta,
               guidance=guidance)
    assert out.device == meta and out.shape == (2, 3, 32, 32)


def test_compiled_pag_run_traces_each_pass_once(monkeypatch):
    """The perturbed blocks keep their fast ops from step to step, so a compiled UNet traces one
    graph for the plain pass and one for the perturbed pass, not one per step."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(th, "compile", lambda fn, mode=None, dynamic=None:
                        th._dynamo.optimize(counting_backend, dynamic=dynamic)(fn))
    _, fast_model, diffusion = models(respacing="ddim4")
    prepare_model(fast_model, compile=True)
    guidance = FastPerturbedAttentionGuidance(fast_model, drop_layers=LAYERS, guidance_window=(2, 0))
    try:
        with th.no_grad():
            diffusion.ddim_sample_loop(fast_model, (2, 3, 32, 32), model_kwargs={"y": Y}, guidance=guidance)
    finally:
        th._dynamo.reset()
    assert len(graphs) == 2


# ---------------------------------------------------------------------------------- wiring


def test_pag_class_and_classifier_overlap():
    assert pag_class() is PerturbedAttentionGuidance
    assert pag_class(fast_attention=True, dtype="bf16") is FastPerturbedAttentionGuidance
    model, fast_model, diffusion = models(respacing="ddim3")
    calls = []

    def cond_fn(x, t, y=None):
        calls.append(t)
        return 0.1 * th.ones_like(x)

    overlap = ClassifierGradientOverlap(cond_fn)
    guidance = FastPerturbedAttentionGuidance(fast_model, drop_layers=LAYERS, overlap=overlap)
    samples = []
    for paired in (cond_fn, overlap):
        pair_overlap(guidance, paired)
        calls.clear()
        with th.no_grad():
            samples.append(diffusion.ddim_sample_loop(fast_model, (2, 3, 32, 32), noise=th.ones(2, 3, 32, 32),
                                                      model_kwargs={"y": Y}, cond_fn=paired, guidance=guidance))
        assert len(calls) == 3  # one gradient per step, prefetched or not, none wasted
    assert th.equal(samples[0], samples[1])


def test_benchmark_prints_pag_and_seg_rows(capsys):
    """scripts/benchmark_sampling.py with PAG / SEG (in process, exact and fast path): their
    table and the fast-path figures (shortcut gain, draw cost, two passes vs one 2B batch)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_sampling.py"
    spec = importlib.util.spec_from_file_location("benchmark_sampling", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--layouts", "tiny", "--batch_sizes", "1", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--paths", "exact,fast", "--guidances", "pag,seg"])
    lines = capsys.readouterr().out.splitlines()
    tables = [[line.split("|")[1:-1] for line in lines[i + 2:]] for i, line in enumerate(lines)
              if line.startswith("| layout")]
    assert len(tables) == 2 and not any("SAG ms/step" in line for line in lines)
    pag_rows = [[c.strip() for c in cells] for cells in tables[0][:2]]
    assert [row[2] for row in pag_rows] == ["exact fp32", "fast (bf16)"]
    assert pag_rows[0][8] == "1.00x" and pag_rows[1][8].endswith("x")  # PAG speed-up vs exact
    fast_row = [c.strip() for c in tables[1][0]]
    assert fast_row[2] == "fast (bf16)" and all(cell.endswith("x") for cell in fast_row[3:])
    with pytest.raises(SystemExit):
        script.parse_args(["--guidances", "pag,sgs"])
