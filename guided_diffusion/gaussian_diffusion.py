"""Gaussian diffusion (DDPM / IDDPM / ADM): schedules, q and p, the DDPM and DDIM samplers, losses.

Semantics and public signatures follow OpenAI's guided-diffusion. Coefficient tables are float64
numpy arrays; every use indexes them with ``t`` and casts the picked values to float32 before
the per-pixel arithmetic, exactly as the reference does.

Two-pass guidance (SAG, PAG, SEG) plugs in at one place, :meth:`GaussianDiffusion.p_mean_variance`
(``guidance=``), so the DDPM and DDIM samplers share it; see ``guidance.py``.
"""

import enum
import math

import numpy as np
import torch as th

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """The beta schedule ``"linear"`` (Ho et al., scaled to any step count) or ``"cosine"``."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1], capped at ``max_beta``."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the model predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen (LEARNED_RANGE: IDDPM's interpolation)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (plus the VB term when variances are learned)
    RESCALED_MSE = enum.auto()  # MSE with the VB term rescaled, as for RESCALED_KL
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # like KL, rescaled to estimate the full bound

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


_DEVICE_TABLES = {}


def _device_table(arr, device):
    """``arr`` as a tensor on ``device``; accelerator copies are cached (no blocking copy per step)."""
    if device.type == "cpu":
        return th.from_numpy(arr)
    key = (arr.tobytes(), arr.dtype.str, arr.shape, str(device))
    if key not in _DEVICE_TABLES:
        if len(_DEVICE_TABLES) > 256:
            _DEVICE_TABLES.clear()
        _DEVICE_TABLES[key] = th.from_numpy(arr).to(device)
    return _DEVICE_TABLES[key]


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Pick ``arr[timesteps]`` (float64 numpy) as float32 and broadcast it to ``broadcast_shape``."""
    res = _device_table(arr, timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def _nonzero_mask(t, x):
    """1 where t != 0, else 0, shaped to broadcast over ``x`` (no noise at the last step)."""
    return (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))


class GaussianDiffusion:
    """Utilities for training and sampling diffusion models.

    :param betas: 1-D numpy array of betas for each step, from T down... indexed 0..T-1.
    :param rescale_timesteps: pass floats in [0, 1000) to the model instead of step indices.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        assert len(betas.shape) == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = int(betas.shape[0])
        if self.num_timesteps < 2:
            raise ValueError(
                "a diffusion needs at least 2 steps (the clipped posterior log-variance uses "
                "step 1); use e.g. --timestep_respacing 2"
            )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0); the log variance is clipped because it is 0 at t = 0.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    # ------------------------------------------------------------------ model calls

    def _wrap_model(self, model):
        """Hook for subclasses that must translate timesteps (see ``SpacedDiffusion``)."""
        return model

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def run_model(self, model, x, t, model_kwargs=None):
        """The raw model output at respaced index ``t`` (the model sees the original step)."""
        return self._wrap_model(model)(x, self._scale_timesteps(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) (with ``noise`` given: the deterministic re-noising)."""
        if noise is None:
            noise = th.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(
            self.posterior_log_variance_clipped, t, x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None,
                        model_kwargs=None, guidance=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param guidance: optional two-pass guidance (``SelfAttentionGuidance``,
            ``PerturbedAttentionGuidance``); on the steps where it is active it replaces the mean
            and x_0 by guided ones (second UNet pass), so every sampler built on this method is
            guided.
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and
            ``model_output`` (the raw output, e.g. eps | variance values). When guidance was
            applied also ``unguided_pred_xstart`` and, if kept, its intermediates (``sag`` /
            ``pag``).
        """
        model_output = self.run_model(model, x, t, model_kwargs)
        out = self.outputs_from_model_output(model_output, x, t, clip_denoised, denoised_fn)
        if guidance is not None and guidance.is_active(t):
            out = guidance.guide(self, model, x, t, out, model_kwargs, clip_denoised, denoised_fn)
        return out

    def outputs_from_model_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """Everything ``p_mean_variance`` derives from a model output (no model call)."""
        B, C = x.shape[:2]
        assert t.shape == (B,)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            prediction, model_var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # the model outputs [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            prediction = model_output
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # The larger variance, with the first step's set to the posterior's for a
                # better decoder log likelihood.
                variances = np.append(self.posterior_variance[1], self.betas[1:])
                log_variances = np.log(variances)
            else:
                variances, log_variances = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(variances, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variances, t, x.shape)

        def process_xstart(x0):
            return self.process_xstart(x0, clip_denoised, denoised_fn)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, prediction))
            model_mean = prediction
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(prediction)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, prediction))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    @staticmethod
    def process_xstart(x0, clip_denoised=True, denoised_fn=None):
        """An x_0 prediction as the samplers use it: ``denoised_fn``, then clipping to [-1, 1]."""
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        return x0.clamp(-1, 1) if clip_denoised else x0

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        assert x_t.shape == xprev.shape
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # ------------------------------------------------------------------ classifier guidance

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al.; ADM, DDPM)."""
        gradient = self._wrap_model(cond_fn)(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the score (Song et al.; ADM's DDIM variant).

        The x_0 it returns is not clipped again.
        """
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._wrap_model(cond_fn)(
            x, self._scale_timesteps(t), **(model_kwargs or {})
        )
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    # ------------------------------------------------------------------ samplers

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None, guidance=None, guidance_kwargs=None):
        """One ancestral (DDPM) step x_t -> x_{t-1}.

        :return: dict with ``sample``, ``pred_xstart`` (the unguided x_0 prediction, as the
            original SAG code returns) and ``guided_pred_xstart`` (the x_0 the step used).
        """
        with _resolved_guidance(self, model, guidance, guidance_kwargs) as guidance:
            out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs, guidance)
        noise = th.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        return _step_result(sample, out)

    def ddim_prediction(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                        model_kwargs=None, guidance=None, guidance_kwargs=None):
        """The outputs a DDIM step builds on: ``p_mean_variance`` (guidance, clip), then classifier
        guidance on the score. Its ``pred_xstart`` is also the data prediction of the multistep
        solvers (DPM-Solver++, UniPC; ``multistep.py``), so every guidance serves them too."""
        with _resolved_guidance(self, model, guidance, guidance_kwargs) as guidance:
            out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs, guidance)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        return out

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0, guidance=None, guidance_kwargs=None):
        """One DDIM step x_t -> x_{t-1} (noise is drawn every step, even with eta = 0)."""
        out = self.ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs,
                                   guidance, guidance_kwargs)
        # eps is re-derived from the (possibly clipped) x_0.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = th.randn_like(x)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return _step_result(sample, out)

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None,
                            model_kwargs=None, eta=0.0):
        """One deterministic DDIM ODE step x_t -> x_{t+1}."""
        assert eta == 0.0, "reverse ODE only for deterministic path"
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - out["pred_xstart"]
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape)
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False,
                      guidance=None, guidance_kwargs=None):
        """Ancestral sampling from noise; returns the final sample (see ``p_sample``)."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            guidance=guidance, guidance_kwargs=guidance_kwargs,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                  progress=False, guidance=None, guidance_kwargs=None):
        """Yield the output dict of every DDPM step, from t = T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, guidance,
                              guidance_kwargs, dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                                    cond_fn=cond_fn, model_kwargs=model_kwargs))

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                         guidance=None, guidance_kwargs=None):
        """DDIM sampling from noise; returns the final sample."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
            guidance=guidance, guidance_kwargs=guidance_kwargs,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                     progress=False, eta=0.0, guidance=None, guidance_kwargs=None):
        """Yield the output dict of every DDIM step, from t = T-1 down to 0."""
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress, guidance,
                              guidance_kwargs, dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                                    cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta))

    def dpm_solver_sample_loop(self, model, shape, noise=None, steps=20, order=2, solver_type="midpoint",
                               spacing="linspace", final="zero", clip_denoised=True, denoised_fn=None,
                               cond_fn=None, model_kwargs=None, device=None, progress=False,
                               guidance=None, guidance_kwargs=None, lambda_min_clipped=None):
        """DPM-Solver++(``order``M) sampling from noise in ``steps`` model evaluations; returns the
        final sample. Arguments as ``dpm_solver_sample_loop_progressive``."""
        from .multistep import final_sample

        return final_sample(self.dpm_solver_sample_loop_progressive(
            model, shape, noise=noise, steps=steps, order=order, solver_type=solver_type,
            spacing=spacing, final=final, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            guidance=guidance, guidance_kwargs=guidance_kwargs, lambda_min_clipped=lambda_min_clipped))

    def dpm_solver_sample_loop_progressive(self, model, shape, noise=None, steps=20, order=2,
                                           solver_type="midpoint", spacing="linspace", final="zero",
                                           clip_denoised=True, denoised_fn=None, cond_fn=None,
                                           model_kwargs=None, device=None, progress=False,
                                           guidance=None, guidance_kwargs=None, lambda_min_clipped=None):
        """Yield every step of DPM-Solver++ (data prediction; see ``multistep.py``): a dict with
        ``sample``, ``pred_xstart``, ``guided_pred_xstart`` and the raw model timestep ``t``.

        Runs on a diffusion built without respacing (a respaced one raises ValueError).
        :param order: 1, 2 or 3; :param solver_type: "midpoint" or "heun";
        :param spacing: "linspace", "leading", "trailing", "ddim" (guided-diffusion's DDIM set of
            ``steps``), or, fixing the number of steps themselves (``steps`` is then not read),
            "ddimN" or an explicit decreasing list of timesteps;
        :param final: "zero" (last step returns x_0) or "sigma_min" (stop at timestep 0's noise);
        :param lambda_min_clipped: skip timesteps with log-SNR/2 below it (default: -5.1 for the
            cosine schedule, none otherwise).
        """
        from .multistep import DPMSolverPP

        yield from self._multistep(DPMSolverPP(order, solver_type), model, shape, noise, steps, spacing,
                                   final, lambda_min_clipped, clip_denoised, denoised_fn, cond_fn,
                                   model_kwargs, device, progress, guidance, guidance_kwargs)

    def unipc_sample_loop(self, model, shape, noise=None, steps=20, order=2, solver_type="bh2",
                          spacing="linspace", final="zero", clip_denoised=True, denoised_fn=None,
                          cond_fn=None, model_kwargs=None, device=None, progress=False,
                          guidance=None, guidance_kwargs=None, lambda_min_clipped=None):
        """UniPC sampling from noise in ``steps`` model evaluations; returns the final sample."""
        from .multistep import final_sample

        return final_sample(self.unipc_sample_loop_progressive(
            model, shape, noise=noise, steps=steps, order=order, solver_type=solver_type,
            spacing=spacing, final=final, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            guidance=guidance, guidance_kwargs=guidance_kwargs, lambda_min_clipped=lambda_min_clipped))

    def unipc_sample_loop_progressive(self, model, shape, noise=None, steps=20, order=2, solver_type="bh2",
                                      spacing="linspace", final="zero", clip_denoised=True,
                                      denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                      progress=False, guidance=None, guidance_kwargs=None,
                                      lambda_min_clipped=None):
        """Yield every step of UniPC (B(h) predictor with a corrector on every evaluated sample;
        ``solver_type`` "bh2" or "bh1"). Otherwise as ``dpm_solver_sample_loop_progressive``
        (diffusers' UniPC does not clip lambda: pass ``lambda_min_clipped=-math.inf`` to match it
        on the cosine schedule)."""
        from .multistep import UniPC

        yield from self._multistep(UniPC(order, solver_type), model, shape, noise, steps, spacing,
                                   final, lambda_min_clipped, clip_denoised, denoised_fn, cond_fn,
                                   model_kwargs, device, progress, guidance, guidance_kwargs)

    def _multistep(self, method, model, shape, noise, steps, spacing, final, lambda_min_clipped,
                   clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, guidance,
                   guidance_kwargs):
        from .multistep import SolverPlan, multistep_loop_progressive

        plan = SolverPlan.build(self, method, steps, spacing, final, lambda_min_clipped)  # bad arguments fail before any model call
        yield from multistep_loop_progressive(
            self, method, plan, model, shape, noise=noise, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, device=device,
            progress=progress, guidance=guidance, guidance_kwargs=guidance_kwargs)

    def _loop(self, step, model, shape, noise, device, progress, guidance, guidance_kwargs, step_kwargs):
        """The sampling loop shared by DDPM and DDIM."""
        if device is None:
            device = next(model.parameters()).device
        assert isinstance(shape, (tuple, list))
        img = noise if noise is not None else th.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        with _resolved_guidance(self, model, guidance, guidance_kwargs) as guidance:
            for i in indices:
                t = th.full((shape[0],), i, device=device, dtype=th.long)
                if guidance is not None:
                    guidance.step_hint = (t, i)  # the on/off decision needs no device sync
                with th.no_grad():
                    out = step(model, img, t, guidance=guidance, **step_kwargs)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ losses and bounds

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dim (decoder NLL at t = 0)."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where((t == 0), decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Training losses for one batch at timesteps ``t``: dict with ``loss`` [N] and terms."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = self.run_model(model, x_t, t, model_kwargs)
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                B, C = x_t.shape[:2]
                assert model_output.shape == (B, C * 2, *x_t.shape[2:])
                model_output, model_var_values = th.split(model_output, C, dim=1)
                # The VB term trains only the variance: the mean is frozen for it.
                frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    _Constant(frozen_out), x_start, x_t, t, clip_denoised=False
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for equivalence with the initial IDDPM implementation.
                    terms["vb"] *= self.num_timesteps / 1000.0
            target = {
                ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
                ModelMeanType.START_X: lambda: x_start,
                ModelMeanType.EPSILON: lambda: noise,
            }[self.model_mean_type]()
            assert model_output.shape == target.shape == x_start.shape
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim (not trainable)."""
        batch_size = x_start.shape[0]
        t = th.tensor([self.num_timesteps - 1] * batch_size, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dim, with its per-step terms."""
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = th.tensor([t] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t_batch, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}


class _Constant:
    """A stand-in model that returns a fixed output (for the VB term on a frozen mean)."""

    def __init__(self, output):
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


def _step_result(sample, out):
    """A sampler step's return value: the unguided x_0 under the original's key."""
    result = {"sample": sample, "pred_xstart": out.get("unguided_pred_xstart", out["pred_xstart"]),
              "guided_pred_xstart": out["pred_xstart"]}
    for key in ("sag", "pag"):  # the guidance's intermediates (keep_intermediates=True)
        if key in out:
            result[key] = out[key]
    return result


def _resolved_guidance(diffusion, model, guidance, guidance_kwargs):
    """Context manager giving the guidance object for a sampler call (see ``guidance.resolve_guidance``)."""
    from .guidance import resolve_guidance

    return resolve_guidance(diffusion, model, guidance, guidance_kwargs)
