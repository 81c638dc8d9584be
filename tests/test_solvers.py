"""The multistep solvers (guided_diffusion/multistep.py): diffusers' trajectories (the public
goldens, and references made with diffusers 0.42.1 in tests/reference/diffusers), the schedule
table, DDIM equivalence at order 1 with SAG and classifier guidance, the order of accuracy of
every update rule, and the API's errors."""

import json
import math

import numpy as np
import pytest
import torch as th

from golden_sag import GoldenCase
from guided_diffusion import multistep as ms
from guided_diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from guided_diffusion.respace import space_timesteps
from guided_diffusion.sag import SelfAttentionGuidance
from guided_diffusion.script_util import create_gaussian_diffusion
from reference_paths import BUNDLED
from solver_helpers import analytic_model, golden_unet

CPU = th.device("cpu")
LOOPS = {"dpm++": "dpm_solver_sample_loop_progressive", "unipc": "unipc_sample_loop_progressive"}


def assert_trajectory(steps, timesteps, samples, clip, label=""):
    """The issue's tolerances: identical timesteps; per step |diff| <= 1e-5 x max(1, max|x|)
    unclipped, <= 1e-3 clipped."""
    assert [int(s["t"][0]) for s in steps] == [int(t) for t in timesteps], label
    assert len(steps) == len(samples)
    for k, (out, expected) in enumerate(zip(steps, samples)):
        err = np.abs(out["sample"].numpy() - expected).max()
        tol = 1e-3 if clip else 1e-5 * max(1.0, np.abs(expected).max())
        assert err <= tol, f"{label} step {k}: {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------ diffusers' trajectories


@pytest.fixture(scope="module")
def unet_cache():
    return {}


def unet_for(meta_flags, cache):
    key = json.dumps(meta_flags, sort_keys=True)
    if key not in cache:
        flags = dict(meta_flags, timestep_respacing="")
        cache[key] = golden_unet(flags)
    return cache[key]


@pytest.mark.parametrize("name", ["diffusers_dpmpp2m_10", "diffusers_dpmpp2m_10_clip",
                                  "diffusers_dpmpp1_gdddim10_clip"])
def test_public_dpm_solver_goldens(golden_dir, unet_cache, name):
    data = np.load(golden_dir / "solvers" / f"{name}.npz")
    meta = json.loads(str(data["meta_json"]))
    config, schedule = meta["scheduler"]["config"], meta["scheduler"]["set_timesteps"]
    model, diffusion = unet_for(meta["eps_fn"]["model_flags"], unet_cache)
    spacing = schedule.get("timesteps", config["timestep_spacing"])
    steps = list(diffusion.dpm_solver_sample_loop_progressive(
        model, (2, 3, 32, 32), noise=th.from_numpy(data["in__noise"]),
        steps=schedule.get("num_inference_steps", 20), order=config["solver_order"],
        solver_type=config["solver_type"], spacing=spacing, final=config["final_sigmas_type"],
        clip_denoised=config["thresholding"], model_kwargs={"y": th.from_numpy(data["in__y"])}))
    assert_trajectory(steps, data["out__model_timesteps"], data["out__samples_per_step"],
                      config["thresholding"], name)
    # The data prediction the solver used is diffusers' converted model output.
    tol = 1e-3 if config["thresholding"] else 1e-5 * np.abs(data["out__x0_per_step"]).max()
    for out, x0 in zip(steps, data["out__x0_per_step"]):
        assert np.abs(out["guided_pred_xstart"].numpy() - x0).max() <= tol


def test_unipc_default_on_the_golden_unet(unet_cache):
    """UniPC with diffusers' defaults, 10 steps, on the tiny golden UNet (reference made by
    tests/reference/diffusers/make_reference.py), with and without the clamp."""
    data = np.load(BUNDLED / "diffusers" / "unipc_unet.npz")
    meta = json.loads(str(data["meta_json"]))
    model, diffusion = unet_for(meta["model_flags"], unet_cache)
    for i, case in enumerate(meta["cases"]):
        steps = list(diffusion.unipc_sample_loop_progressive(
            model, (2, 3, 32, 32), noise=th.from_numpy(data["in__noise"]), steps=case["steps"],
            clip_denoised=case["clip"], model_kwargs={"y": th.from_numpy(data["in__y"])}))
        assert_trajectory(steps, data[f"out__{i}__timesteps"], data[f"out__{i}__samples"], case["clip"],
                          f"unipc clip={case['clip']}")


ANALYTIC = np.load(BUNDLED / "diffusers" / "analytic.npz")
ANALYTIC_CASES = json.loads(str(ANALYTIC["meta_json"]))["cases"]


def case_id(case):
    spacing = case.get("spacing", "linspace")
    spacing = "list" if isinstance(spacing, list) else spacing
    return (f"{case['sampler']}-{case['schedule']}-p{case['order']}-{case['solver_type']}-{case['final']}-"
            f"{spacing}-N{case.get('steps', 'x')}-{'clip' if case['clip'] else 'noclip'}")


@pytest.mark.parametrize("index", range(len(ANALYTIC_CASES)), ids=[case_id(c) for c in ANALYTIC_CASES])
def test_diffusers_settings_on_an_analytic_model(index):
    """DPM-Solver++ and UniPC over orders, solver types, terminals, spacings, step counts, clamp
    and the cosine schedule, against diffusers, with a cheap nonlinear eps(x, t)."""
    case = ANALYTIC_CASES[index]
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule=case["schedule"])
    noise = th.from_numpy(ANALYTIC["in__noise"])
    loop = getattr(diffusion, LOOPS[case["sampler"]])
    # diffusers' UniPC has no lambda clipping; ours clips the cosine schedule by default.
    clipping = dict(lambda_min_clipped=-math.inf) if case["sampler"] == "unipc" else {}
    steps = list(loop(analytic_model, tuple(noise.shape), noise=noise.clone(), steps=case.get("steps", 20),
                      order=case["order"], solver_type=case["solver_type"],
                      spacing=case.get("spacing", "linspace"), final=case["final"],
                      clip_denoised=case["clip"], device=CPU, **clipping))
    timesteps, samples = ANALYTIC[f"out__{index}__timesteps"], ANALYTIC[f"out__{index}__samples"]
    if case["solver_type"] == "bh1" and case["final"] == "zero":
        # diffusers' first-order bh1 step into sigma 0 computes -inf * 0 = NaN; ours is x_0.
        assert np.isnan(samples[-1]).all()
        assert th.equal(steps[-1]["sample"], steps[-1]["guided_pred_xstart"])
        steps, samples = steps[:-1], samples[:-1]
        timesteps = timesteps[:len(samples)]
    assert_trajectory(steps, timesteps, samples, case["clip"], case_id(case))


# ------------------------------------------------------------------ the schedule table


def test_timesteps_and_sigmas_match_diffusers_table(golden_dir):
    """Every spacing of schedules.npz we offer: diffusers' linspace / leading / trailing with
    both terminals, the cosine schedule with lambda clipped at -5.1, guided-diffusion's ddimN
    and plain N respacing (as an explicit list). Karras / LU sigmas are not offered (they
    round the timestep but not the sigma)."""
    table = np.load(golden_dir / "solvers" / "schedules.npz")
    linear = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    cosine = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    np.testing.assert_allclose(linear.alphas_cumprod, table["out__linear_alphas_cumprod_float64_gd"], rtol=1e-12)
    np.testing.assert_allclose(cosine.alphas_cumprod, table["out__cosine_alphas_cumprod_float64_gd"], rtol=1e-12)
    counts = sorted({int(k.split("_N")[1].split("__")[0]) for k in table.files if "dpmsolver_linspace_zero_N" in k})
    assert counts == [5, 9, 10, 15, 20, 25, 50, 100, 250]

    def check(diffusion, method, key, steps, spacing, final):
        plan = ms.SolverPlan.build(diffusion, method, steps, spacing, final)
        np.testing.assert_array_equal(plan.levels.timesteps, table[f"out__{key}__timesteps"], err_msg=key)
        if f"out__{key}__sigmas" in table.files:  # diffusers' VE-style sigma = sigma / alpha
            # (diffusers' float32 table: up to 1e-4 relative near t = 0, where 1 - ab is tiny)
            np.testing.assert_allclose(plan.levels.sigma / plan.levels.alpha, table[f"out__{key}__sigmas"],
                                       rtol=2e-4, atol=0, err_msg=key)

    for n in counts:
        for spacing in ms.SPACINGS:
            for final in ms.FINALS:
                check(linear, ms.DPMSolverPP(), f"dpmsolver_{spacing}_{final}_N{n}", n, spacing, final)
        check(cosine, ms.DPMSolverPP(), f"dpmsolver_cosine_clip5.1_N{n}", n, "linspace", "zero")
        check(linear, ms.DPMSolverPP(), f"gd_respace_ddim{n}", n, "ddim", "zero")
        check(linear, ms.DPMSolverPP(), f"gd_respace_ddim{n}", 20, f"ddim{n}", "zero")
        listed = table[f"out__gd_respace_{n}__timesteps"]
        check(linear, ms.UniPC(), f"gd_respace_{n}", 7, listed.tolist(), "zero")
        check(linear, ms.UniPC(), f"gd_respace_{n}", 7, ",".join(map(str, listed)), "zero")


def test_spacing_examples_and_rounding():
    ab = create_gaussian_diffusion(steps=1000).alphas_cumprod
    assert ms.solver_timesteps(ab, 10).tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert 480 in ms.solver_timesteps(ab, 25).tolist()  # 479.52 rounds up; 500.5-style ties to even
    assert ms.solver_timesteps(ab, 10, "leading").tolist() == list(range(900, 0, -90))
    assert ms.solver_timesteps(ab, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert ms.solver_timesteps(ab, 9, "ddim").tolist()[:2] == [896, 784]  # not diffusers' 888, 777
    cos = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    plan = ms.SolverPlan.build(cos, ms.DPMSolverPP(), 10)
    assert plan.levels.timesteps.tolist() == [995, 896, 796, 696, 597, 498, 398, 298, 199, 100]
    assert ms.SolverPlan.build(cos, ms.UniPC(), 10).levels.timesteps[0] == 995  # the same for UniPC
    for method in (ms.DPMSolverPP(), ms.UniPC()):  # diffusers' UniPC, diffusers' default
        assert ms.SolverPlan.build(cos, method, 10, lambda_min_clipped=-math.inf).levels.timesteps[0] == 999


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "between 1 and the schedule's 1000"),
    (dict(steps=1001), "between 1 and the schedule's 1000"),
    (dict(steps=1000), "repeats timestep"),
    (dict(steps=1000, spacing="leading"), "repeats timestep"),
    (dict(spacing=[999, 500, 500, 10]), "repeats timestep(s) [500]"),
    (dict(spacing="999,500,700"), "strictly decreasing"),
    (dict(spacing=[1000, 10]), "lie in 0..999"),
    (dict(spacing="quadratic"), "unknown spacing"),
    (dict(spacing="ddim999"), "cannot create exactly 999 steps"),
    (dict(spacing=[900, 0], final="sigma_min"), "sigma_min"),
    (dict(final="sigma"), "final must be one of"),
    (dict(order=0), "order must be 1, 2 or 3"),
    (dict(order=4), "order must be 1, 2 or 3"),
    (dict(solver_type="bh2"), "solver_type must be one of midpoint, heun"),
])
def test_bad_arguments_fail_before_any_model_call(kwargs, message):
    diffusion = create_gaussian_diffusion(steps=1000)

    def model(*args, **kw):
        raise AssertionError("the model was called")

    with pytest.raises(ValueError) as info:
        diffusion.dpm_solver_sample_loop(model, (1, 3, 4, 4), device=CPU, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_respaced_diffusion_is_refused_and_the_full_one_accepted():
    respaced = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim10")
    with pytest.raises(ValueError, match="build it without timestep_respacing"):
        respaced.unipc_sample_loop(analytic_model, (1, 3, 4, 4), steps=5, device=CPU)
    identity = create_gaussian_diffusion(steps=1000, timestep_respacing="1000")  # respaced to itself
    base = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=identity.model_mean_type,
                             model_var_type=identity.model_var_type, loss_type=identity.loss_type)
    noise = th.randn(1, 3, 4, 4)
    a, b = (d.unipc_sample_loop(analytic_model, noise.shape, noise=noise, steps=5, device=CPU)
            for d in (identity, base))
    assert th.allclose(a, b, rtol=0, atol=1e-6)


def test_zero_terminal_returns_the_last_data_prediction_and_outputs():
    diffusion = create_gaussian_diffusion(steps=1000)
    noise = th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(3))
    for loop in (diffusion.dpm_solver_sample_loop_progressive, diffusion.unipc_sample_loop_progressive):
        steps = list(loop(analytic_model, noise.shape, noise=noise, steps=6, device=CPU))
        assert [sorted(s) for s in steps] == [["guided_pred_xstart", "pred_xstart", "sample", "t"]] * 6
        assert steps[-1]["t"].tolist() == [166, 166] and steps[-1]["t"].dtype == th.long  # 166.5: to even
        assert th.equal(steps[-1]["sample"], steps[-1]["pred_xstart"])
        assert steps[-1]["sample"].abs().max() <= 1  # clipped


# ------------------------------------------------------------------ order 1 = DDIM, guidance


def test_order_one_on_ddim10_reproduces_the_sag_ddim_golden(golden_dir):
    """DPM-Solver++(1) on the ddim10 timesteps, with SAG on every step, on the model's full
    schedule: the original SAG code's DDIM trajectory (masks exactly; samples and the returned
    unguided x_0 per step within 1e-3). SAG's re-noising runs at the raw timestep."""
    case = GoldenCase(golden_dir, "pub_ddim_loop")
    model, diffusion = case.build(timestep_respacing="")
    call = case.meta["call"]
    flags = case.meta["model_flags"]
    with SelfAttentionGuidance(model, sel_attn_block=flags["sel_attn_block"],
                               sel_attn_depth=flags["sel_attn_depth"], keep_intermediates=True,
                               **call["guidance_kwargs"]) as sag:
        steps = list(diffusion.dpm_solver_sample_loop_progressive(
            model, tuple(call["shape"]), noise=case.input("noise"), order=1, spacing="ddim10",
            model_kwargs=case.model_kwargs(), guidance=sag))
    assert [int(s["t"][0]) for s in steps] == case.expected("t_original").tolist()
    for k, out in enumerate(steps):
        mask = out["sag"]["mask"][:, 0].to(th.uint8).numpy()
        np.testing.assert_array_equal(mask, case.expected("traj_mask_lowres")[k], err_msg=f"step {k}")
        np.testing.assert_allclose(out["sample"].numpy(), case.expected("traj_sample")[k], rtol=0, atol=1e-3)
        np.testing.assert_allclose(out["pred_xstart"].numpy(), case.expected("traj_pred_xstart")[k],
                                   rtol=0, atol=1e-3)
    np.testing.assert_allclose(steps[-1]["sample"].numpy(), case.expected("sample"), rtol=0, atol=5e-3)


def test_order_one_on_ddim10_reproduces_the_pag_ddim_golden(golden_dir):
    """The same for PAG (the original PAG code's ddim10 trajectory, window [10, 0]), where the
    PAG guidance exists (skipped otherwise)."""
    pag = pytest.importorskip("guided_diffusion.pag")
    path = golden_dir / "pag" / "ddim10_pag.npz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = np.load(path)
    meta = json.loads(str(data["meta_json"]))
    model, diffusion = golden_unet(dict(meta["model_flags"], timestep_respacing=""),
                                   golden_dir / "pag" / meta["unet_weights"])
    guidance = pag.PerturbedAttentionGuidance(
        model, guide_scale=meta["cli"]["guide_scale"], drop_layers=meta["cli"]["drop_layers"],
        guidance_window=meta["cli"]["guidance_strategies"]["attention_mask_identity"])
    with guidance:
        steps = list(diffusion.dpm_solver_sample_loop_progressive(
            model, (2, 3, 32, 32), noise=th.from_numpy(data["in__noise"]), order=1, spacing="ddim10",
            model_kwargs={"y": th.from_numpy(data["in__y"])}, guidance=guidance))
    assert [int(s["t"][0]) for s in steps] == list(range(900, -1, -100))
    for k, out in enumerate(steps):
        np.testing.assert_allclose(out["sample"].numpy(), data["out__samples_per_step"][k], rtol=0, atol=1e-3)


def test_order_one_equals_our_ddim_with_a_sag_window_and_classifier_guidance():
    """SAG switching on mid-run (guide_start compared with the respaced index N-1-k) and
    classifier guidance (condition_score, no re-clip) through the solver at order 1 give our
    DDIM's trajectory on the respaced ddim6 diffusion, step for step."""
    from tiny_models import tiny_model_and_diffusion

    model, base = tiny_model_and_diffusion(num_res_blocks=1, timestep_respacing="")
    respaced = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim6")
    gen = th.Generator().manual_seed(5)
    noise, y = th.randn(2, 3, 32, 32, generator=gen), th.tensor([3, 8])
    seen = []

    def cond_fn(x, t, y=None):
        seen.append(int(t[0]))  # the classifier sees the raw timestep in both runs
        return 0.05 * th.cos(3 * x) * (1 + y.view(-1, 1, 1, 1))

    runs = []
    for diffusion, loop, kw in ((respaced, "ddim_sample_loop_progressive", {}),
                                (base, "dpm_solver_sample_loop_progressive", dict(order=1, spacing="ddim6"))):
        with SelfAttentionGuidance(model, guide_scale=1.8, guide_start=3, blur_sigma=2.0,
                                   sel_attn_block="output", sel_attn_depth=1, keep_intermediates=True) as sag:
            runs.append(list(getattr(diffusion, loop)(model, noise.shape, noise=noise.clone(), cond_fn=cond_fn,
                                                      model_kwargs={"y": y}, guidance=sag, **kw)))
    ddim, solver = runs
    assert seen[:6] == seen[6:] == sorted(space_timesteps(1000, "ddim6"), reverse=True)
    assert ["sag" in s for s in solver] == [False, False, False, True, True, True]
    for k, (a, b) in enumerate(zip(ddim, solver)):
        for key in ("sample", "pred_xstart", "guided_pred_xstart"):
            assert th.allclose(a[key], b[key], rtol=0, atol=2e-5), (k, key)


# ------------------------------------------------------------------ order of accuracy


MU, S = 0.3, 0.5  # data ~ N(MU, S^2): the probability-flow ODE is solved in closed form


def exact_path(lam, z):
    """x(lambda) on the ODE trajectory through standard score z, and the exact data prediction."""
    alpha = 1 / math.sqrt(1 + math.exp(-2 * lam))
    sigma = alpha * math.exp(-lam)
    scale = math.sqrt(alpha ** 2 * S ** 2 + sigma ** 2)
    return alpha * MU + scale * z, MU + alpha * S ** 2 * z / scale


def toy_levels(lams):
    lams = np.asarray(lams, dtype=np.float64)
    alpha = 1 / np.sqrt(1 + np.exp(-2 * lams))
    return ms.NoiseLevels(np.arange(len(lams) - 1)[::-1], alpha, alpha * np.exp(-lams), lams)


def local_error(rule, order, h, corrector=False):
    """|one step from exact history - exact solution| on a non-uniform lambda grid of step h."""
    z = 1.3
    ratios = [1.0, 0.8, 1.25, 0.9]  # the previous steps, relative to h
    lams = [0.2]
    for r in ratios[1:order + 1]:
        lams.insert(0, lams[0] - r * h)
    lams.append(lams[-1] + h)
    levels, k = toy_levels(lams), len(lams) - 2
    xs, x0s = zip(*(exact_path(lam, z) for lam in lams))
    if corrector:  # correct x_{k+1} from x_k and x0 at k+1, k, k-1, ...
        c, w = rule(levels, k + 1, order)
        history = [x0s[k + 1]] + [x0s[k - j] for j in range(order)]
    else:
        c, w = rule(levels, k, order)
        history = [x0s[k - j] for j in range(order)]
    return abs(c * xs[k] + sum(wi * x0 for wi, x0 in zip(w, history)) - xs[k + 1])


@pytest.mark.parametrize("rule, orders, gain", [
    (lambda lv, k, q: ms.dpm_solver_update(lv, k, q, "midpoint"), (1, 2, 3), 1),
    (lambda lv, k, q: ms.dpm_solver_update(lv, k, q, "heun"), (2, 3), 1),
    (lambda lv, k, q: ms.unipc_predictor(lv, k, q, "bh2"), (1, 2, 3), 1),
    (lambda lv, k, q: ms.unipc_predictor(lv, k, q, "bh1"), (1, 2, 3), 1),
    (lambda lv, k, q: ms.unipc_corrector(lv, k, q, "bh2"), (1, 2, 3), 2),
    (lambda lv, k, q: ms.unipc_corrector(lv, k, q, "bh1"), (1, 2, 3), 2),
], ids=["dpm-midpoint", "dpm-heun", "unip-bh2", "unip-bh1", "unic-bh2", "unic-bh1"])
def test_local_error_has_the_published_order(rule, orders, gain):
    """One step from exact history: error O(h^(p+1)) for DPM-Solver++ and UniP of order p,
    O(h^(p+2)) for UniC of order p (UniPC's corrector raises the order by one)."""
    corrector = gain == 2
    for order in orders:
        errors = [local_error(rule, order, h, corrector) for h in (0.2, 0.1, 0.05)]
        slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        assert min(slopes) > order + gain - 0.3, (order, slopes)


def test_whole_runs_converge_and_the_corrector_helps():
    """Whole runs on a uniform log-SNR grid (lambda -3 .. 3, terminal at 3): the first-order
    warm-up limits multistep methods to global order 2; order 1 is first order; UniPC-2 beats
    DPM-Solver++(2M) at equal steps."""
    z = np.linspace(-2, 2, 9)

    def error(method, n):
        lams = np.linspace(-3, 3, n + 1)
        plan = ms.SolverPlan(toy_levels(lams), tuple(method.orders(n, "sigma_min")))
        integrator = ms.MultistepIntegrator(method, plan)
        x = exact_path(lams[0], z)[0]
        for k in range(n):
            alpha, sigma = plan.levels.alpha[k], plan.levels.sigma[k]
            x0 = MU + alpha * S ** 2 * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)
            x = integrator.step(k, x, x0)
        return np.abs(x - exact_path(lams[-1], z)[0]).max()

    def order(method):
        return math.log2(error(method, 32) / error(method, 64))

    assert 0.9 < order(ms.DPMSolverPP(1)) < 1.1
    for method in (ms.DPMSolverPP(2), ms.DPMSolverPP(3), ms.DPMSolverPP(2, "heun"), ms.UniPC(1), ms.UniPC(3)):
        assert order(method) > 1.9, method
    assert error(ms.UniPC(2), 16) < 0.5 * error(ms.DPMSolverPP(2), 16)
