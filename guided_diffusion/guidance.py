"""What the two-pass guidances (SAG, PAG, SEG) share, and how a sampler call finds its guidance.

Each guidance runs the UNet a second time on a perturbed input (SAG: a blurred, re-noised x_t)
or with a perturbed network (PAG, SEG: chosen attention blocks changed) and pushes eps away from
that pass::

    guided_eps = eps_2 + guide_scale * (eps_1 - eps_2)

The guided step then takes x_0 from ``guided_eps`` (``denoised_fn``, clipping), the DDPM mean
from the posterior at that x_0, and the (learned) variance from the first, unperturbed pass.

Which eps: as in the original SAG and PAG code, eps is the model's own output for eps-predicting
models; for x_0-predicting models (``START_X``) it is derived from the raw x_0 prediction, and
for x_{t-1}-predicting models (``PREVIOUS_X``) from the processed (``denoised_fn``, clipped)
x_0. Every guidance object has ``guide_scale``, ``step_hint``, ``is_active(t)``,
``guide(...)`` and ``close()``; ``GaussianDiffusion.p_mean_variance(guidance=...)`` calls it.
"""

import contextlib
import math

import torch.nn as nn

from .gaussian_diffusion import ModelMeanType


class TwoPassGuidance:
    """Base of SAG / PAG / SEG: the scale, the on/off decision per step, the context protocol.

    Subclasses implement ``active_at(step)`` (respaced index) and ``guide(...)``.
    """

    def __init__(self, guide_scale):
        guide_scale = float(guide_scale)
        if not math.isfinite(guide_scale):
            raise ValueError(f"--guide_scale must be a finite number, got {guide_scale}")
        self.guide_scale = guide_scale
        # (t tensor, host-side respaced index), set by the sampling loops so that deciding
        # whether a step is guided needs no device-to-host copy of t.
        self.step_hint = None

    def current_step(self, t):
        """The respaced index of step ``t``: the loop's hint for this very tensor, else ``t[0]``."""
        hint = self.step_hint
        return hint[1] if hint is not None and hint[0] is t else int(t[0])

    def is_active(self, t):
        """Whether step ``t`` is guided (``guide_scale == 1`` never is: one UNet pass)."""
        if self.guide_scale == 1.0:
            return False
        return self.active_at(self.current_step(t))

    def active_at(self, step):
        raise NotImplementedError

    def close(self):
        """Release what the guidance attached to the model (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_window(window):
    """``(start, end)`` respaced indices, both inclusive, ``start >= end``; a clear error otherwise."""
    try:
        start, end = window
    except (TypeError, ValueError):
        raise ValueError(f"a guidance window is [start, end], got {window!r}") from None
    for value in (start, end):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"a guidance window is two finite numbers [start, end], got {window!r}")
    if start < end:
        raise ValueError(f"guidance window {list(window)}: start must be >= end "
                         "(steps count down from T-1 to 0)")
    return start, end



def pass_eps(diffusion, model_output, x, t, clip_denoised=True, denoised_fn=None, pred_xstart=None):
    """The eps one UNet pass stands for (see the module docstring).

    :param model_output: the raw output of the pass at input ``x`` (eps / x_0 / x_{t-1} rows
        first, learned-variance rows after them).
    :param pred_xstart: the pass's processed x_0 if already known (``PREVIOUS_X`` needs it).
    """
    prediction = model_output[:, :x.shape[1]]
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        return prediction
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return diffusion._predict_eps_from_xstart(x, t, prediction)
    if pred_xstart is None:
        pred_xstart = diffusion.process_xstart(
            diffusion._predict_xstart_from_xprev(x, t, prediction), clip_denoised, denoised_fn)
    return diffusion._predict_eps_from_xstart(x, t, pred_xstart)


def guided_outputs(diffusion, first, eps, other_eps, guide_scale, x, t, clip_denoised, denoised_fn):
    """``p_mean_variance``'s outputs for ``eps_2 + s (eps_1 - eps_2)``; variance from ``first``.

    Returns ``(out, guided_eps)``. ``out["unguided_pred_xstart"]`` is the first pass's x_0 (the
    samplers return it as ``pred_xstart``, as the original code did); ``out["model_output"]`` stays
    the first pass's raw output.
    """
    guided_eps = other_eps + guide_scale * (eps - other_eps)
    pred_xstart = diffusion.process_xstart(
        diffusion._predict_xstart_from_eps(x, t, guided_eps), clip_denoised, denoised_fn)
    mean, _, _ = diffusion.q_posterior_mean_variance(pred_xstart, x, t)
    out = dict(first, mean=mean, pred_xstart=pred_xstart, unguided_pred_xstart=first["pred_xstart"])
    return out, guided_eps


# ---------------------------------------------------------------------------------- guidance_kwargs


def find_unet(diffusion, model, guidance_kwargs):
    """The UNet a ``guidance_kwargs`` call perturbs or probes: ``guidance_kwargs["model"]``, the
    sampler's model when it is a module, else the one ``create_model_and_diffusion`` built."""
    unet = guidance_kwargs.get("model")
    if unet is None and isinstance(model, nn.Module):
        unet = model
    if unet is None and getattr(diffusion, "sag_model_ref", None) is not None:
        unet = diffusion.sag_model_ref()
    if unet is None:
        raise ValueError(
            "guidance_kwargs needs the UNet: pass the model itself, add guidance_kwargs['model'], "
            "or build it with create_model_and_diffusion"
        )
    return unet


@contextlib.contextmanager
def resolve_guidance(diffusion, model, guidance, guidance_kwargs):
    """The guidance object for one sampler call.

    ``guidance`` (an object) wins. Otherwise ``guidance_kwargs`` builds one for the duration of
    the call: with ``guidance_strategies`` a PAG / SEG guidance (``pag.guidance_from_kwargs``),
    else the original SAG dict (``guide_scale``, ``guide_start``, ``blur_sigma``, ...). Neither:
    no guidance.
    """
    if guidance is not None or guidance_kwargs is None:
        yield guidance
        return
    unet = find_unet(diffusion, model, guidance_kwargs)
    kwargs = {k: v for k, v in guidance_kwargs.items() if k != "model"}
    if "guidance_strategies" in kwargs:
        from .pag import guidance_from_kwargs
    else:
        from .sag import guidance_from_kwargs
    built = guidance_from_kwargs(diffusion, unet, kwargs)
    try:
        yield built
    finally:
        built.close()
