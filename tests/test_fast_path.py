"""The fast path (guided_diffusion/fast_path.py, fast_attention.py) against the exact path, on CPU."""

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

from guided_diffusion.fast_attention import (
    SDPAAttention,
    attention_colsum_chunked,
    use_exact_attention,
)
from guided_diffusion.fast_path import (
    ClassifierGradientOverlap,
    FastSelfAttentionGuidance,
    fast_path_defaults,
    fast_path_flags,
    prepare_model,
    sag_class,
)
from guided_diffusion.sag import SelfAttentionGuidance, attention_colsum, gaussian_blur
from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    randomize_weights_,
)
from guided_diffusion.unet import QKVAttention, QKVAttentionLegacy

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "legacy": dict(),
    "new_order": dict(use_new_attention_order=True),
    "head_channels": dict(num_head_channels=8),
}


def tiny(layout="legacy", respacing="ddim5", seed=0):
    flags = model_and_diffusion_defaults()
    flags.update(image_size=32, num_channels=32, channel_mult="1,1,1", attention_resolutions="32,16,8",
                 num_heads=4, num_res_blocks=1, learn_sigma=True, class_cond=True,
                 timestep_respacing=respacing, **LAYOUTS[layout])
    th.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**flags)
    randomize_weights_(model, std=0.05)
    return model.eval(), diffusion


def inputs(seed=1):
    """x [2, 3, 32, 32], timesteps, labels."""
    gen = th.Generator().manual_seed(seed)
    return th.randn(2, 3, 32, 32, generator=gen), th.tensor([999, 500]), th.randint(0, 1000, (2,), generator=gen)


def test_randomize_weights_reaches_zero_initialised_layers_and_is_seeded():
    fresh, _ = create_model_and_diffusion(**dict(model_and_diffusion_defaults(), image_size=32, num_channels=32,
                                                 channel_mult="1,1,1", attention_resolutions="16",
                                                 num_res_blocks=1))
    assert fresh.out[-1].weight.abs().max() == 0  # ADM's zero-initialised output conv
    first = copy.deepcopy(fresh)
    assert randomize_weights_(first, std=0.02, seed=3) is first
    second = randomize_weights_(copy.deepcopy(fresh), std=0.02, seed=3)
    assert first.out[-1].weight.abs().min() > 0
    assert 0.015 < first.out[-1].weight.std().item() < 0.025
    for a, b in zip(first.parameters(), second.parameters()):
        assert th.equal(a, b)
    third = randomize_weights_(copy.deepcopy(fresh), std=0.02, seed=4)
    assert not th.equal(first.out[-1].weight, third.out[-1].weight)


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sdpa_forward_matches_exact_fp32(layout):
    model, _ = tiny(layout)
    fast = prepare_model(copy.deepcopy(model), fast_attention=True)
    assert all(isinstance(b.attention, SDPAAttention) for b in fast.modules() if hasattr(b, "qkv"))
    x, t, y = inputs()
    with th.no_grad():
        assert max_rel(fast(x, t, y), model(x, t, y)) < 1e-5


@pytest.mark.parametrize("layout", ["legacy", "new_order"])
def test_bf16_autocast_matches_within_bf16_tolerance(layout):
    model, _ = tiny(layout)
    fast = prepare_model(copy.deepcopy(model), fast_attention=True, dtype="bf16", channels_last=True)
    x, t, y = inputs()
    with th.no_grad():
        try:
            out = fast(x, t, y)
        except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
            pytest.skip(f"CPU bf16 autocast unsupported here: {exc}")
        ref = model(x, t, y)
    assert out.dtype == th.float32
    assert max_rel(out, ref) < 3e-2


@pytest.mark.parametrize("layout", ["legacy", "new"])
@pytest.mark.parametrize("length", [64, 256])
def test_chunked_colsum_equals_exact(layout, length):
    gen = th.Generator().manual_seed(3)
    qkv = 2 * th.randn(3, 3 * 4 * 16, length, generator=gen)
    exact = attention_colsum(qkv, 4, layout)
    for budget in (1 << 24, 3 * 4 * length * 7):  # one chunk; chunks of 7 queries (ragged end)
        assert (attention_colsum_chunked(qkv, 4, layout, max_elements=budget) - exact).abs().max() < 1e-5


def test_state_dict_unchanged_and_prepare_is_reversible():
    model, _ = tiny("new_order")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_model(model, fast_attention=True, dtype="bf16", channels_last=True)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(th.equal(after[k], before[k]) for k in before)
    use_exact_attention(model)
    assert all(isinstance(b.attention, QKVAttention) for b in model.modules() if hasattr(b, "qkv"))


def test_defaults_keep_the_exact_path():
    model, _ = tiny()
    flags = fast_path_flags(fast_path_defaults())
    assert prepare_model(model, **flags) is model
    assert "forward" not in vars(model)
    assert all(isinstance(b.attention, QKVAttentionLegacy) for b in model.modules() if hasattr(b, "qkv"))
    assert sag_class(**flags) is SelfAttentionGuidance
    assert sag_class(**dict(flags, fast_attention=True)) is FastSelfAttentionGuidance


def sag_trajectory(model, diffusion, cls, sag_heads, noise, y, steps_seed=7):
    sag = cls(model, guide_scale=1.5, guide_start=100, blur_sigma=3.0, sel_attn_block="output",
              sel_attn_depth=1, sag_heads=sag_heads, keep_intermediates=True)
    th.manual_seed(steps_seed)
    with sag:
        return list(diffusion.ddim_sample_loop_progressive(
            model, noise.shape, noise=noise.clone(), model_kwargs={"y": y}, guidance=sag))


@pytest.mark.parametrize("layout,sag_heads", [("legacy", "reference"), ("new_order", "reference"),
                                              ("new_order", "model"), ("head_channels", "model")])
def test_fast_sag_masks_and_steps_match_exact(layout, sag_heads):
    model, diffusion = tiny(layout, respacing="ddim4")
    fast = prepare_model(copy.deepcopy(model), fast_attention=True)
    x, _, y = inputs()
    exact_steps = sag_trajectory(model, diffusion, SelfAttentionGuidance, sag_heads, x, y)
    fast_steps = sag_trajectory(fast, diffusion, FastSelfAttentionGuidance, sag_heads, x, y)
    masks = [(a["sag"]["mask"] == b["sag"]["mask"]).float().mean().item()
             for a, b in zip(exact_steps, fast_steps)]
    assert len(masks) == 4 and min(masks) >= 0.99, masks
    for a, b in zip(exact_steps, fast_steps):
        assert max_rel(b["sag"]["guided_eps"], a["sag"]["guided_eps"]) < 1e-4
    assert max_rel(fast_steps[-1]["sample"], exact_steps[-1]["sample"]) < 1e-4


def test_fast_sag_layout_follows_the_swapped_op():
    model, _ = tiny("new_order")
    prepare_model(model, fast_attention=True)
    with FastSelfAttentionGuidance(model, sel_attn_block="output", sel_attn_depth=1, sag_heads="model") as sag:
        assert (sag.layout, sag.num_heads) == ("new", 4)


def test_fast_sag_blur_and_step_hint():
    model, _ = tiny()
    sag = FastSelfAttentionGuidance(model, guide_start=3, sel_attn_block="output", sel_attn_depth=1)
    x = th.randn(2, 3, 32, 32)
    assert th.equal(sag.blur(x, 3.0), gaussian_blur(x, 3.0))
    t = th.tensor([2, 2])
    assert sag.is_active(t)
    sag.step_hint = (t, 5)  # the host-side index wins for that very tensor (no device sync)
    assert not sag.is_active(t)
    assert sag.is_active(th.tensor([2, 2]))  # a different tensor: read from t
    sag.close()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_classifier_overlap_gives_the_same_samples(sampler):
    model, diffusion = tiny(respacing="ddim3")
    weight = th.randn(3, 32, 32, generator=th.Generator().manual_seed(5))

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            score = (th.tanh(x_in * weight) * (t.float()[:, None, None, None] / 1000)).sum()
            return th.autograd.grad(score, x_in)[0]

    x, _, y = inputs()
    results = []
    for overlap in (None, ClassifierGradientOverlap(cond_fn)):
        sag = FastSelfAttentionGuidance(model, guide_start=100, blur_sigma=3.0, sel_attn_block="output",
                                        sel_attn_depth=1, overlap=overlap)
        loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
        th.manual_seed(11)
        with sag:
            results.append(loop(model, x.shape, noise=x.clone(), model_kwargs={"y": y},
                                cond_fn=overlap or cond_fn, guidance=sag))
    assert th.equal(results[0], results[1])


def test_benchmark_tiny_runs_and_prints_table():
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark_sampling.py"), "--tiny", "--classifier_guidance", "True",
           "--guidances", "sag"]  # PAG / SEG rows: tests/test_fast_pag.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    paths = ["exact fp32", "orig-style fp16", "fast (bf16)"]
    sag_table, cg_table = lines[-11:-6], lines[-5:]
    assert sag_table[0].startswith("| layout | batch | path | plain ms/step")
    assert cg_table[0].startswith("| layout | batch | path | SAG+CG ms/step")
    for table in (sag_table, cg_table):
        assert [line.split("|")[3].strip() for line in table[2:]] == paths
    gains = [line.split("|")[-2].strip() for line in cg_table[2:]]
    assert gains[:2] == ["-", "-"] and gains[2].endswith("x")


def sampling_loops(diffusion):
    """Every sampler's loop, called alike (the solvers at order 3: every update rule runs)."""
    return {"ddim": diffusion.ddim_sample_loop, "ddpm": diffusion.p_sample_loop,
            "dpm++": functools.partial(diffusion.dpm_solver_sample_loop, steps=6, order=3),
            "unipc": functools.partial(diffusion.unipc_sample_loop, steps=6, order=3)}


SOLVER_RESPACING = {"ddim": "ddim6", "ddpm": "6", "dpm++": "", "unipc": ""}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++", "unipc"])
@pytest.mark.parametrize("fast", [False, True])
def test_sampling_loop_reads_no_device_value(sampler, fast):
    """The whole loop (SAG on some steps, off on others, classifier guidance) runs on the meta
    device, where any read of a tensor's value on the host (``.item()``, ``bool``, ``int``,
    ``.cpu()``) raises: so the loop has no host-device synchronisation per step."""
    from guided_diffusion.sampling import classifier_cond_fn
    from guided_diffusion.script_util import classifier_defaults, create_classifier

    model, diffusion = tiny(respacing=SOLVER_RESPACING[sampler])
    flags = classifier_defaults()
    flags.update(image_size=32, classifier_width=32, classifier_depth=1,
                 classifier_attention_resolutions="16,8")
    classifier = create_classifier(**flags).eval()
    meta = th.device("meta")
    model, classifier = prepare_model(model.to(meta), fast_attention=fast), classifier.to(meta)
    cond_fn = classifier_cond_fn(classifier, 1.0)  # the one scripts/classifier_sample.py uses
    overlap = ClassifierGradientOverlap(cond_fn) if fast else None
    extra = dict(overlap=overlap) if fast else {}
    sag = sag_class(fast_attention=fast)(model, guide_scale=1.5, guide_start=3, blur_sigma=3.0,
                                          sel_attn_block="output", sel_attn_depth=1, **extra)
    loop = sampling_loops(diffusion)[sampler]
    y = th.zeros(2, dtype=th.long, device=meta)
    with sag:
        out = loop(model, (2, 3, 32, 32), noise=th.empty(2, 3, 32, 32, device=meta),
                   model_kwargs={"y": y}, cond_fn=overlap or cond_fn, device=meta, guidance=sag)
        assert out.device == meta and out.shape == (2, 3, 32, 32)
        with pytest.raises((RuntimeError, NotImplementedError)):  # the check can fail
            sag.is_active(th.zeros(2, dtype=th.long, device=meta))


@pytest.mark.parametrize("sampler, dtype", [("dpm++", "fp32"), ("unipc", "bf16")])
def test_solvers_on_the_fast_path_match_the_exact_path(sampler, dtype):
    """SAG + classifier guidance through a solver loop: SDPA attention, channels_last, the fast
    SAG and the overlapped classifier gradient (fp32: the exact numbers up to rounding), and
    bf16 autocast (within bf16 tolerance)."""
    model, diffusion = tiny(respacing="")
    fast = prepare_model(copy.deepcopy(model), fast_attention=True, dtype=dtype, channels_last=True)
    weight = th.randn(3, 32, 32, generator=th.Generator().manual_seed(5))

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            return th.autograd.grad((th.tanh(x_in * weight)).sum(), x_in)[0] * 0.1

    x, _, y = inputs()
    results = []
    for net, cls, grad in ((model, SelfAttentionGuidance, cond_fn),
                           (fast, FastSelfAttentionGuidance, ClassifierGradientOverlap(cond_fn))):
        extra = dict(overlap=grad) if cls is FastSelfAttentionGuidance else {}
        with cls(net, guide_scale=1.5, guide_start=3, blur_sigma=3.0, sel_attn_block="output",
                 sel_attn_depth=1, keep_intermediates=True, **extra) as sag:
            loop = getattr(diffusion, {"dpm++": "dpm_solver_sample_loop_progressive",
                                       "unipc": "unipc_sample_loop_progressive"}[sampler])
            try:
                results.append(list(loop(net, x.shape, noise=x.clone(), steps=5, order=3, cond_fn=grad,
                                         model_kwargs={"y": y}, guidance=sag)))
            except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
                pytest.skip(f"CPU {dtype} autocast unsupported here: {exc}")
    exact, quick = results
    masks = [(a["sag"]["mask"] == b["sag"]["mask"]).float().mean().item()
             for a, b in zip(exact, quick) if "sag" in a]
    assert len(masks) == 3 and min(masks) >= (0.99 if dtype == "fp32" else 0.9), masks
    assert max_rel(quick[-1]["sample"], exact[-1]["sample"]) < (1e-4 if dtype == "fp32" else 5e-2)


def test_pair_overlap_prefetches_only_for_its_own_cond_fn():
    """A guidance object reused for a run without classifier guidance (visualize_sag.py's SAG
    row) computes no classifier gradient; paired with the overlap it prefetches again."""
    from guided_diffusion.fast_path import pair_overlap

    model, diffusion = tiny(respacing="ddim3")
    calls = []

    def cond_fn(x, t, y=None):
        calls.append(t)
        return th.zeros_like(x)

    overlap = ClassifierGradientOverlap(cond_fn)
    x, _, y = inputs()
    with FastSelfAttentionGuidance(model, guide_start=100, blur_sigma=3.0, sel_attn_block="output",
                                   sel_attn_depth=1, overlap=overlap) as sag:
        for paired, expected_calls in ((None, 0), (overlap, 3)):
            calls.clear()
            pair_overlap(sag, paired)
            assert sag.overlap is paired
            diffusion.ddim_sample_loop(model, x.shape, noise=x.clone(), model_kwargs={"y": y},
                                       cond_fn=paired, guidance=sag)
            assert len(calls) == expected_calls  # one gradient per step, prefetched, none wasted
    exact = SelfAttentionGuidance(model, guide_start=100, sel_attn_block="output", sel_attn_depth=1)
    pair_overlap(exact, overlap)  # the exact guidance has no overlap: left alone
    assert not hasattr(exact, "overlap")
    exact.close()


@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_compiled_sag_run_traces_the_unet_once(monkeypatch, sampler):
    """Both SAG passes (and unguided steps) reuse one compiled graph: the probe is not paused
    on the fast path, since dynamo guards on its on/off flag (two full compilations before).
    The solvers' loops call the UNet alike (one graph, no recompilation per timestep)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def compile_counting(fn, mode=None, dynamic=None):
        return th._dynamo.optimize(counting_backend, dynamic=dynamic)(fn)

    monkeypatch.setattr(th, "compile", compile_counting)
    model, diffusion = tiny(respacing="ddim4" if sampler == "ddim" else "")
    prepare_model(model, fast_attention=True, compile=True)
    x, _, y = inputs()
    loop = (diffusion.ddim_sample_loop if sampler == "ddim"
            else functools.partial(diffusion.unipc_sample_loop, steps=4))
    try:
        with FastSelfAttentionGuidance(model, guide_scale=1.5, guide_start=2, blur_sigma=3.0,
                                       sel_attn_block="output", sel_attn_depth=1) as sag:
            loop(model, x.shape, noise=x, model_kwargs={"y": y}, guidance=sag)
    finally:
        th._dynamo.reset()
    assert len(graphs) == 1
