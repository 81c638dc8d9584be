"""Multistep exponential-integrator samplers on ADM's own discrete schedule: DPM-Solver++ (orders
1-3, "2M"/"3M"; Lu et al. 2022, arXiv 2211.01095) and UniPC (B(h) predictor-corrector; Zhao et
al. 2023, arXiv 2302.04867), step for step as diffusers' ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` run them on a 1000-step DDPM schedule.

The pieces, in order:

1. :func:`solver_timesteps` - the integer model timesteps t_0 > ... > t_{N-1} (diffusers'
   ``linspace`` / ``leading`` / ``trailing`` spacings, guided-diffusion's ``ddimN`` set, or an
   explicit list);
2. :class:`NoiseLevels` - alpha, sigma and lambda = log(alpha / sigma) at those timesteps (from the
   diffusion's float64 ``alphas_cumprod``) plus the terminal point: (1, 0, +inf) for
   ``final="zero"``, or timestep 0 for ``final="sigma_min"``;
3. the update rules, as float64 coefficients of one linear combination
   ``x_next = c * x + sum_j w_j * x0_j`` of the current sample and the latest data predictions
   (:func:`dpm_solver_update`, :func:`unipc_predictor`, :func:`unipc_corrector`);
4. :func:`multistep_loop_progressive` - the sampling loop. Its data prediction x0_k at (x_k, t_k)
   is exactly the ``pred_xstart`` our DDIM step computes (:meth:`GaussianDiffusion.ddim_prediction`:
   model, guidance hook, clip, classifier guidance on the score), so every guidance rides along
   with no special case here, and DPM-Solver++ of order 1 on the ``ddimN`` timesteps *is* DDIM.

Conventions shared with diffusers (so the trajectories match): the model sees the raw integer
timestep; the first step is first order and the order rises by one per step up to ``order``;
DPM-Solver++ takes a first-order last step with a zero terminal or fewer than 15 steps, and a
step of at most second order before it below 15 steps; UniPC lowers the order at the end
(``min(order, steps left)``) and corrects every sample it evaluated the model at except the
last one; UniPC's order-2 predictor and order-1 corrector use the fixed weight 1/2. Differences:
our coefficients are float64 (diffusers: float32), applied to float32 tensors as
``_extract_into_tensor`` applies the schedule; a first-order UniPC ``bh1`` step into a zero
terminal returns x0 where diffusers produces NaN (``-inf * 0``); and on the cosine schedule
both solvers skip the timesteps with lambda < -5.1 by default, as diffusers' DPM-Solver++ is
configured for it (diffusers' UniPC has no such option: ``lambda_min_clipped=-inf`` matches it).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch as th

from .gaussian_diffusion import _resolved_guidance, _step_result, get_named_beta_schedule
from .respace import space_timesteps

SPACINGS = ("linspace", "leading", "trailing")  # besides "ddim", "ddimN" and explicit lists
FINALS = ("zero", "sigma_min")
DPM_SOLVER_TYPES = ("midpoint", "heun")
UNIPC_SOLVER_TYPES = ("bh2", "bh1")
MAX_ORDER = 3
# Default lambda_min_clipped on the cosine schedule (diffusers' DPM-Solver++ setting for it):
# skips its last four timesteps (lambda -5.37 .. -9.92), where x0 = (x - sigma eps) / alpha
# divides by alpha < 1e-2 (UniPC from t = 999 saturates the bundled cosine model's samples).
# It would clip nothing of the linear schedule (min -5.06).
COSINE_LAMBDA_MIN = -5.1
# Below this many steps DPM-Solver++ lowers the order of its last two steps (diffusers).
LOWER_ORDER_FINAL_BELOW = 15


# ---------------------------------------------------------------------------------- timesteps


def solver_timesteps(alphas_cumprod, steps, spacing="linspace", lambda_min_clipped=-math.inf):
    """The model timesteps t_0 > ... > t_{N-1} of a solver run, as an int64 numpy array.

    :param alphas_cumprod: the model's float64 schedule (T entries).
    :param steps: N, for "linspace", "leading", "trailing" and "ddim" (ignored by the spacings
        that fix their own count: "ddimN" and explicit lists).
    :param spacing: "linspace" | "leading" | "trailing" (diffusers' formulas, after dropping the
        timesteps whose lambda is below ``lambda_min_clipped``); "ddim" / "ddimN"
        (guided-diffusion's DDIM set with N steps, integer stride, ending at 0); or the
        timesteps themselves (a list of ints or a comma-separated string), strictly decreasing.
    :raises ValueError: with a one-line message for anything that does not give N >= 1
        distinct, decreasing timesteps in [0, T-1].
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(alphas_cumprod)
    if isinstance(spacing, str) and spacing in SPACINGS:
        steps = _check_steps(steps, T)
        lam = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))
        last = T - int(np.count_nonzero(lam < lambda_min_clipped))
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1]
        else:
            timesteps = np.arange(last, 0, -T / steps).round() - 1
        what = f"spacing {spacing!r} with {steps} steps"
    elif isinstance(spacing, str) and spacing.startswith("ddim"):
        count = _check_steps(steps if spacing == "ddim" else _parse_int(spacing[4:], spacing), T)
        try:
            timesteps = sorted(space_timesteps(T, f"ddim{count}"), reverse=True)
        except ValueError as exc:
            raise ValueError(f"spacing 'ddim' with {count} steps: {exc}") from None
        what = f"spacing 'ddim{count}'"
    else:
        timesteps = _explicit_timesteps(spacing)
        what = "the timestep list"
    timesteps = np.asarray(timesteps).astype(np.int64)
    _check_timesteps(timesteps, T, what)
    return timesteps


def _parse_int(text, context):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"cannot read a step count in spacing {context!r}") from None


def _check_steps(steps, T):
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(f"the number of steps must be an integer, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"the number of steps must be between 1 and the schedule's {T}, got {steps}")
    return int(steps)


def _explicit_timesteps(spacing):
    if isinstance(spacing, str):
        items = [s for s in spacing.replace(" ", "").split(",") if s]
        if not items:
            raise ValueError(f"unknown spacing {spacing!r}: expected one of {', '.join(SPACINGS)}, "
                             "ddim, ddimN or a comma-separated list of timesteps")
        try:
            return [int(s) for s in items]
        except ValueError:
            raise ValueError(f"unknown spacing {spacing!r}: expected one of {', '.join(SPACINGS)}, "
                             "ddim, ddimN or a comma-separated list of timesteps") from None
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or not np.all(values == np.round(values)):
        raise ValueError(f"a timestep list must be a 1-D list of integers, got {spacing!r}")
    return values


def _check_timesteps(timesteps, T, what):
    if timesteps.ndim != 1 or len(timesteps) == 0:
        raise ValueError(f"{what} gives no timesteps")
    if timesteps.min() < 0 or timesteps.max() > T - 1:
        raise ValueError(f"{what}: timesteps must lie in 0..{T - 1}, got {timesteps.tolist()[:8]}")
    if len(np.unique(timesteps)) != len(timesteps):
        repeated = sorted({int(t) for t in timesteps if np.count_nonzero(timesteps == t) > 1}, reverse=True)
        raise ValueError(f"{what} repeats timestep(s) {repeated[:5]}: use fewer steps or another spacing")
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"{what}: timesteps must be strictly decreasing, got {timesteps.tolist()[:8]}")


# ---------------------------------------------------------------------------------- noise levels


@dataclass(frozen=True)
class NoiseLevels:
    """alpha_n = sqrt(ab), sigma_n = sqrt(1 - ab), lambda_n = log(alpha_n / sigma_n) (float64) at the
    solver's timesteps, plus one terminal entry: (1, 0, +inf) for "zero", timestep 0's for
    "sigma_min"."""

    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray

    @classmethod
    def build(cls, alphas_cumprod, timesteps, final="zero"):
        if final not in FINALS:
            raise ValueError(f"final must be one of {', '.join(FINALS)}, got {final!r}")
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        ab = alphas_cumprod[timesteps]
        alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
        if final == "zero":
            end_alpha, end_sigma = 1.0, 0.0
        else:
            if timesteps[-1] == 0:
                raise ValueError("final 'sigma_min' ends at timestep 0, which is already the last "
                                 "timestep: use final 'zero' or timesteps that end above 0")
            end_alpha, end_sigma = math.sqrt(alphas_cumprod[0]), math.sqrt(1.0 - alphas_cumprod[0])
        alpha, sigma = np.append(alpha, end_alpha), np.append(sigma, end_sigma)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at a zero terminal
        return cls(np.asarray(timesteps), alpha, sigma, lam)

    @property
    def steps(self):
        return len(self.timesteps)


# ---------------------------------------------------------------------------------- update rules
#
# Every rule returns (c, weights): the next sample is c * x + sum_j weights[j] * x0[j], where x0[0]
# is the newest data prediction and x0[j] the one j model evaluations earlier. Step k goes from
# point k to point k + 1 of NoiseLevels.


def dpm_solver_orders(steps, order, final="zero"):
    """DPM-Solver++'s order at each step (diffusers' lower_order_final=True, euler_at_final=False)."""
    orders = []
    for k in range(steps):
        last = k == steps - 1
        if order == 1 or k == 0 or (last and (final == "zero" or steps < LOWER_ORDER_FINAL_BELOW)):
            orders.append(1)
        elif order == 2 or k == 1 or (k == steps - 2 and steps < LOWER_ORDER_FINAL_BELOW):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def dpm_solver_update(levels, k, order, solver_type="midpoint"):
    """DPM-Solver++ (data prediction) multistep update from point k to k + 1.

    With h = lambda_{k+1} - lambda_k, phi = exp(-h) - 1, a = alpha_{k+1} and
    c = sigma_{k+1} / sigma_k: x_{k+1} = c x_k - a phi x0_k + (higher-order terms in the divided
    differences D of the previous x0's; "midpoint" -a phi D / 2, "heun" a (phi / h + 1) D).
    """
    lam = levels.lam
    a, c = levels.alpha[k + 1], levels.sigma[k + 1] / levels.sigma[k]
    h = lam[k + 1] - lam[k]
    phi = math.expm1(-h)  # -1 at a zero terminal
    first = -a * phi
    if order == 1:
        return c, (first,)
    r0 = (lam[k] - lam[k - 1]) / h
    if order == 2:  # D = (x0_k - x0_{k-1}) / r0
        g = -0.5 * a * phi if solver_type == "midpoint" else a * (phi / h + 1.0)
        return c, (first + g / r0, -g / r0)
    # Order 3: D1_0 = (x0_k - x0_{k-1}) / r0, D1_1 = (x0_{k-1} - x0_{k-2}) / r1,
    # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
    r1 = (lam[k - 1] - lam[k - 2]) / h
    g1 = a * (phi / h + 1.0)
    g2 = -a * ((phi + h) / h ** 2 - 0.5)
    e0 = g1 * (1.0 + r0 / (r0 + r1)) + g2 / (r0 + r1)  # weight of D1_0
    e1 = -g1 * r0 / (r0 + r1) - g2 / (r0 + r1)  # weight of D1_1
    return c, (first + e0 / r0, -e0 / r0 + e1 / r1, -e1 / r1)


def unipc_orders(steps, order):
    """UniPC's predictor order at each step: warm-up from 1, and min(order, steps left) at the end."""
    return [min(order, k + 1, steps - k) for k in range(steps)]


def _unipc_terms(h, order, solver_type):
    """h phi_1(-h) = exp(-h) - 1, B(h) and the right-hand side b_1..b_order of UniPC's order
    conditions, b_i = i! h phi_{i+1}(-h) / B(h) (data prediction, so the "hh" of the paper is -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B = h_phi_1 if solver_type == "bh2" else hh
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, B, np.array(b)


def _vandermonde(rks, size):
    """Rows r^0, r^1, ... of the ratios ``rks`` (with the trailing 1), ``size`` x ``size``."""
    return np.array([[r ** i for r in rks[:size]] for i in range(size)])


def unipc_predictor(levels, k, order, solver_type="bh2"):
    """UniP-B(h) from point k to k + 1 with ``order - 1`` previous data predictions:
    x_{k+1} = c x_k - a hphi1 x0_k - a B sum_i rho_i (x0_{k-i} - x0_k) / r_i,
    r_i = (lambda_{k-i} - lambda_k) / h; rho = 1/2 at order 2, else the order conditions."""
    lam = levels.lam
    a, c = levels.alpha[k + 1], levels.sigma[k + 1] / levels.sigma[k]
    h = lam[k + 1] - lam[k]
    if order == 1:
        return c, (-a * math.expm1(-h),)
    h_phi_1, B, b = _unipc_terms(h, order, solver_type)
    rks = [(lam[k - i] - lam[k]) / h for i in range(1, order)] + [1.0]
    rhos = [0.5] if order == 2 else np.linalg.solve(_vandermonde(rks, order - 1), b[:-1])
    return c, _history_weights(a, h_phi_1, B, rks, rhos, newest=None)


def unipc_corrector(levels, k, order, solver_type="bh2"):
    """UniC-B(h): the corrected x_k, recomputed from point k - 1 (its corrected sample and data
    predictions) plus the new x0_k; ``order`` is the predictor's order of step k - 1.

    x_k^c = c x_{k-1} - a hphi1 x0_{k-1} - a B (sum_i rho_i (x0_{k-1-i} - x0_{k-1}) / r_i
    + rho_last (x0_k - x0_{k-1})), rho = 1/2 at order 1, else solving all ``order`` conditions.
    Weights are for [x0_k, x0_{k-1}, x0_{k-2}, ...].
    """
    lam = levels.lam
    a, c = levels.alpha[k], levels.sigma[k] / levels.sigma[k - 1]
    h = lam[k] - lam[k - 1]
    h_phi_1, B, b = _unipc_terms(h, order, solver_type)
    rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, order)] + [1.0]
    rhos = [0.5] if order == 1 else np.linalg.solve(_vandermonde(rks, order), b)
    return c, _history_weights(a, h_phi_1, B, rks, rhos[:-1], newest=rhos[-1])


def _history_weights(a, h_phi_1, B, rks, rhos, newest):
    """Weights of [x0_new (corrector only), x0_base, x0_base-1, ...] in
    -a hphi1 x0_base - a B (sum_i rho_i (x0_{base-i} - x0_base) / r_i + newest (x0_new - x0_base))."""
    base = -a * h_phi_1
    older = []
    for rho, r in zip(rhos, rks):
        older.append(-a * B * rho / r)
        base += a * B * rho / r
    if newest is None:
        return (base, *older)
    base += a * B * newest
    return (-a * B * newest, base, *older)


def combine(c, x, weights, x0s):
    """c * x + sum_j weights[j] * x0s[j]: float64 coefficients, each rounded to float32 and
    applied to the float32 tensors (no device value is read on the host)."""
    out = x * float(c)
    for w, x0 in zip(weights, x0s):
        out = out + x0 * float(w)
    return out


# ---------------------------------------------------------------------------------- methods


class DPMSolverPP:
    """DPM-Solver++(``order``M), data prediction, ``midpoint`` or ``heun`` second-order terms."""

    name = "DPM-Solver++"
    solver_types = DPM_SOLVER_TYPES

    def __init__(self, order=2, solver_type="midpoint"):
        self.order, self.solver_type = _check_order(order), _check_type(solver_type, self)

    def orders(self, steps, final):
        return dpm_solver_orders(steps, self.order, final)

    def predictor(self, levels, k, order):
        return dpm_solver_update(levels, k, order, self.solver_type)

    corrector = None


class UniPC:
    """UniPC with the B(h) variants ``bh2`` (diffusers' default) or ``bh1``, data prediction,
    a corrector on every step (diffusers: predict_x0=True, disable_corrector=[])."""

    name = "UniPC"
    solver_types = UNIPC_SOLVER_TYPES

    def __init__(self, order=2, solver_type="bh2"):
        self.order, self.solver_type = _check_order(order), _check_type(solver_type, self)

    def orders(self, steps, final):
        return unipc_orders(steps, self.order)

    def predictor(self, levels, k, order):
        return unipc_predictor(levels, k, order, self.solver_type)

    def corrector(self, levels, k, order):
        return unipc_corrector(levels, k, order, self.solver_type)


def _check_order(order):
    if isinstance(order, bool) or order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"the solver order must be 1, 2 or 3, got {order!r}")
    return int(order)


def _check_type(solver_type, method):
    if solver_type not in method.solver_types:
        raise ValueError(f"{method.name} solver_type must be one of {', '.join(method.solver_types)}, "
                         f"got {solver_type!r}")
    return solver_type


def _is_cosine(diffusion):
    """Whether the diffusion runs the cosine schedule (a respaced-to-itself diffusion re-derives
    its betas, equal up to float64 rounding)."""
    betas = diffusion.betas
    return np.allclose(betas, get_named_beta_schedule("cosine", len(betas)), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------- the loop


def check_base_diffusion(diffusion, what="a multistep solver"):
    """Refuse a respaced diffusion: the solvers read the model's full schedule at raw timesteps."""
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is not None and list(timestep_map) != list(range(diffusion.original_num_steps)):
        raise ValueError(
            f"{what} samples on the model's full schedule, but this diffusion is respaced to "
            f"{len(timestep_map)} of {diffusion.original_num_steps} timesteps: build it without "
            "timestep_respacing and choose the solver's timesteps with steps= and spacing= "
            "(e.g. spacing='ddim25' for the DDIM timesteps)")


@dataclass(frozen=True)
class SolverPlan:
    """Everything a run needs on the host: timesteps, noise levels and the order of each step."""

    levels: NoiseLevels
    orders: tuple

    @classmethod
    def build(cls, diffusion, method, steps=20, spacing="linspace", final="zero", lambda_min_clipped=None):
        check_base_diffusion(diffusion, method.name)
        if lambda_min_clipped is None:
            lambda_min_clipped = COSINE_LAMBDA_MIN if _is_cosine(diffusion) else -math.inf
        timesteps = solver_timesteps(diffusion.alphas_cumprod, steps, spacing, lambda_min_clipped)
        levels = NoiseLevels.build(diffusion.alphas_cumprod, timesteps, final)
        return cls(levels, tuple(method.orders(levels.steps, final)))


class MultistepIntegrator:
    """The solver's state over one run: feed it the data prediction at each evaluated sample and
    it returns the next sample (after correcting the current one, for UniPC). Works on any
    arrays that support ``*`` and ``+`` with Python floats (torch tensors, numpy arrays)."""

    def __init__(self, method, plan):
        self.method, self.plan = method, plan
        self.x0s = []  # data predictions, newest first (at most MAX_ORDER kept)
        self.previous = None  # (corrected sample, predictor order) of the last step

    def step(self, k, x, x0):
        """x_{k+1} from x_k (as evaluated) and x0_k = the data prediction at (x_k, t_k)."""
        levels, order = self.plan.levels, self.plan.orders[k]
        if self.method.corrector is not None and self.previous is not None:
            x_prev, prev_order = self.previous
            c, weights = self.method.corrector(levels, k, prev_order)
            x = combine(c, x_prev, weights, [x0] + self.x0s)
        self.x0s = [x0] + self.x0s[:MAX_ORDER - 1]
        self.previous = (x, order)
        c, weights = self.method.predictor(levels, k, order)
        return combine(c, x, weights, self.x0s)


def multistep_loop_progressive(diffusion, method, plan, model, shape, noise=None, clip_denoised=True,
                               denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                               progress=False, guidance=None, guidance_kwargs=None):
    """Yield one dict per model evaluation k = 0..N-1: ``sample`` (x_{k+1}), ``pred_xstart`` and
    ``guided_pred_xstart`` (as the DDIM step returns them; the solver uses the guided one) and
    ``t`` (the raw model timestep t_k). The last ``sample`` is the result.

    Guidance sees ``step_hint = (t, N - 1 - k)``: step k is respaced index N - 1 - k, the index
    SAG's ``guide_start`` (and any windowed guidance) is compared with, as for a DDIM run with
    N respaced steps.
    """
    if device is None:
        device = next(model.parameters()).device
    assert isinstance(shape, (tuple, list))
    x = noise if noise is not None else th.randn(*shape, device=device)
    timesteps, N = plan.levels.timesteps, plan.levels.steps
    integrator = MultistepIntegrator(method, plan)
    steps = range(N)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps)
    with _resolved_guidance(diffusion, model, guidance, guidance_kwargs) as guidance:
        for k in steps:
            t = th.full((shape[0],), int(timesteps[k]), device=device, dtype=th.long)
            if guidance is not None:
                guidance.step_hint = (t, N - 1 - k)  # the on/off decision needs no device sync
            with th.no_grad():
                out = diffusion.ddim_prediction(model, x, t, clip_denoised=clip_denoised,
                                                denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                model_kwargs=model_kwargs, guidance=guidance)
                x = integrator.step(k, x, out["pred_xstart"])
            result = _step_result(x, out)
            result["t"] = t
            yield result


def final_sample(progressive):
    """The last step's ``sample`` of a progressive loop."""
    final = None
    for final in progressive:
        pass
    return final["sample"]
