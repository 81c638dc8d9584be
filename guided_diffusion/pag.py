"""Perturbed-Attention Guidance (PAG, Ahn et al., arXiv 2403.17377) and Smoothed Energy Guidance
(SEG, Hong, arXiv 2408.00760) for ADM / IDDPM UNets.

Both run the UNet a second time on the same ``x_t, t, y`` with the inner attention op of chosen
``AttentionBlock`` s replaced, and push eps away from that pass,
``eps = eps_pert + guide_scale * (eps - eps_pert)`` (``guidance.py``). The UNet stays a plain
UNet: :func:`perturbed_attention` swaps the ops in only for the perturbed pass and puts the
originals back. Each block keeps its own qkv order (legacy or new), perturbed or not.

Strategies (the PAG code's ``--guidance_strategies`` names, plus ``seg``):

* ``attention_mask_identity`` (PAG): before the softmax, logits are set to -inf where a uniform
  draw ``th.rand(B*heads, T, T) < noise_scale``, keeping the diagonal. With ``noise_scale 1``
  the attention map is the identity and the block's attention output is exactly v.
* ``attention_mask``: the same without keeping the diagonal (an ablation; with ``noise_scale 1``
  every logit of a row is -inf and the output NaN, as in the original: guidance refuses that).
* ``seg`` (SEG): the queries, per head, before the attention scale, are blurred over the block's
  square token grid with a Gaussian of ``seg_sigma`` tokens (kernel ``ceil(6 sigma)`` rounded up
  to odd, capped at the grid size + 1 for even grids, reflect padding); ``seg_sigma > 9999``
  (strict) replaces every query by the mean query. No random draws.

RNG, as the original PAG code: every perturbed forward draws one ``th.rand`` mask per perturbed
layer (shape ``(B*heads, T, T)``, global generator of the model's device, in forward order),
also with ``noise_scale 1`` where the mask is fixed, so seeded DDPM runs give the original's
samples. ``reproduce_rng=False`` skips the draws where the mask does not depend on them.
"""

import contextlib
import json
import math
import random

import torch as th
import torch.nn as nn

from .fast_attention import op_layout
from .gaussian_diffusion import ModelMeanType
from .guidance import TwoPassGuidance, check_window, guided_outputs, pass_eps
from .sag import blur_with_kernel, gaussian_kernel1d
from .unet import AttentionBlock, Downsample, ResBlock, Upsample, attend, qkv_heads

PAG = "attention_mask_identity"
MASK = "attention_mask"
SEG = "seg"
STRATEGIES = (PAG, MASK, SEG)
SAG_STRATEGY = "sag"  # the PAG code's name for SAG inside --guidance_strategies

# The published PAG layers of the ImageNet 256 models (16x16, 8x8, 8x8, 8x8) and SEG's default,
# the official "mid" layers (ADM's middle block).
PAG_DEFAULT_LAYERS = ("input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1", "middle_block.1")
SEG_DEFAULT_LAYERS = ("middle_block.1",)
SEG_INFINITE_SIGMA = 9999.0  # sigma > this (strictly) means the mean query, as the official code


# ---------------------------------------------------------------------------------- layers


def attention_layers(model):
    """``{name: (block, side)}`` for every AttentionBlock of ``model`` in forward order.

    ``name`` is the ``named_modules`` path (``input_blocks.14.1``, ``middle_block.1``, ...);
    ``side`` the block's token grid side at ``model.image_size`` (None if unknown).
    """
    sides = _grid_sides(model)
    return {name: (module, sides.get(id(module)))
            for name, module in model.named_modules() if isinstance(module, AttentionBlock)}


def _grid_sides(model):
    """id(AttentionBlock) -> token grid side, following the UNet's down- and upsampling."""
    size = getattr(model, "image_size", None)
    if size is None:
        return {}
    sides, factor = {}, 1
    stages = [getattr(model, "input_blocks", []), [getattr(model, "middle_block", [])],
              getattr(model, "output_blocks", [])]
    for stage in stages:
        for container in stage:
            for layer in container:
                if isinstance(layer, AttentionBlock):
                    sides[id(layer)] = size // factor
                elif isinstance(layer, Downsample) or (
                        isinstance(layer, ResBlock) and isinstance(layer.h_upd, Downsample)):
                    factor *= 2
                elif isinstance(layer, Upsample) or (
                        isinstance(layer, ResBlock) and isinstance(layer.h_upd, Upsample)):
                    factor //= 2
    return sides


def describe_layers(model):
    """``input_blocks.4.1 (16x16), ...``: the valid layer names with their token grids."""
    return ", ".join(name if side is None else f"{name} ({side}x{side})"
                     for name, (_, side) in attention_layers(model).items())


def resolve_layers(model, names, flag="--drop_layers"):
    """The AttentionBlocks named by ``names`` (duplicates dropped); a ValueError listing the valid
    names with their grid sizes for any name that is not one."""
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names or []))
    if not names:
        raise ValueError(f"{flag}: give at least one attention block; valid: {describe_layers(model)}")
    layers = attention_layers(model)
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise ValueError(f"{flag} {' '.join(unknown)}: not an attention block of this model; "
                         f"valid names (token grid): {describe_layers(model)}")
    return [(name, layers[name][0]) for name in names]


# ---------------------------------------------------------------------------------- SEG's blur


def seg_kernel_size(sigma, width):
    """The official kernel rule: ``ceil(6 sigma)`` rounded up to odd, capped at ``width + 1``
    for even widths (``width`` for odd ones)."""
    size = math.ceil(6 * sigma)
    size = size + 1 - size % 2
    return min(size, width - (width % 2 - 1))


def seg_kernel2d(sigma, side, device, dtype):
    """SEG's 2-D blur kernel for a ``side`` x ``side`` grid: the outer product of the float32
    taps cast to ``dtype`` (the official order: normalise, cast, then outer product)."""
    taps = gaussian_kernel1d(sigma, seg_kernel_size(sigma, side)).to(device, dtype)
    return th.outer(taps, taps)


def seg_blur_queries(q, grid, sigma, kernel=None):
    """SEG's query blur: ``q`` [N, C, T] over the square token grid ``grid`` (row-major tokens).

    ``sigma > 9999``: every query becomes the mean query of its (sample, head, channel); else a
    depthwise Gaussian blur (float32 kernel cast to q's dtype, reflect padding). ``kernel``: the
    :func:`seg_kernel2d` of this sigma and grid if already built (the fast path caches it).
    """
    check_square_grid(grid)
    n, ch, length = q.shape
    if sigma > SEG_INFINITE_SIGMA:
        return q.mean(dim=-1, keepdim=True).expand(n, ch, length)
    side = grid[1]
    if kernel is None:
        kernel = seg_kernel2d(sigma, side, q.device, q.dtype)
    blurred = blur_with_kernel(q.reshape(n, ch, side, side), kernel)
    return blurred.reshape(n, ch, length)


def check_square_grid(grid):
    """A ValueError unless ``grid`` is a square (H, W) token grid (the official code's isqrt rule)."""
    if grid is None or len(grid) != 2 or grid[0] != grid[1]:
        raise ValueError(f"SEG blurs the queries over a square 2-D token grid, got "
                         f"{None if grid is None else tuple(grid)}")


# ---------------------------------------------------------------------------------- the perturbation


def check_perturbation(strategy, noise_scale=1.0, seg_sigma=math.inf, guiding=True):
    """Validate a strategy's settings; returns ``(strategy, noise_scale, seg_sigma)`` as floats.

    ``guiding``: also refuse ``attention_mask`` with ``noise_scale 1``, which masks every logit
    (the original then produces NaN; a raw forward under :func:`perturbed_attention` still may).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown perturbation strategy {strategy!r}; supported: "
                         f"{PAG} (PAG), {MASK}, {SEG} (SEG)")
    noise_scale, seg_sigma = float(noise_scale), float(seg_sigma)
    if not 0.0 <= noise_scale <= 1.0:
        raise ValueError(f"--noise_scale is the masking probability, in [0, 1]; got {noise_scale}")
    if guiding and strategy == MASK and noise_scale >= 1.0:
        raise ValueError(f"{MASK} with --noise_scale 1 masks every logit (NaN attention); use a "
                         f"noise_scale below 1, or {PAG} to keep the diagonal")
    if not seg_sigma > 0:  # also NaN
        raise ValueError(f"--seg_blur_sigma must be positive (inf: the mean query), got {seg_sigma}")
    return strategy, noise_scale, seg_sigma


class PerturbedAttention(nn.Module):
    """The inner attention op of a perturbed block (same input and output as the block's own op).

    :param n_heads, new_order: the replaced op's heads and qkv order, kept.
    """

    def __init__(self, n_heads, new_order, strategy, noise_scale=1.0, seg_sigma=math.inf,
                 reproduce_rng=True):
        super().__init__()
        self.n_heads, self.new_order = n_heads, new_order
        self.strategy, self.noise_scale, self.seg_sigma = check_perturbation(
            strategy, noise_scale, seg_sigma, guiding=False)
        self.reproduce_rng = reproduce_rng
        self.grid = None  # the block's spatial shape, recorded by record_grid (SEG)

    def record_grid(self, block, inputs):
        """Forward pre-hook on the AttentionBlock: SEG needs its token grid."""
        self.grid = tuple(inputs[0].shape[2:])

    def forward(self, qkv):
        q, k, v = qkv_heads(qkv, self.n_heads, self.new_order)
        if self.strategy == SEG:
            out = attend(seg_blur_queries(q, self.grid, self.seg_sigma), k, v)
        else:
            length = q.shape[-1]
            out = attend(q, k, v, logit_mask=self.logit_mask((q.shape[0], length, length), q.device))
        return out.reshape(qkv.shape[0], -1, qkv.shape[-1])

    def logit_mask(self, shape, device):
        """True where a logit becomes -inf: ``rand < noise_scale``, diagonal kept for PAG."""
        if self.reproduce_rng or self.noise_scale < 1.0:
            mask = th.rand(shape, device=device) < self.noise_scale
        else:  # rand in [0, 1) is always < 1: the same mask without the draw
            mask = th.ones(shape, dtype=th.bool, device=device)
        if self.strategy == PAG:
            mask.diagonal(dim1=-2, dim2=-1).fill_(False)
        return mask

    def extra_repr(self):
        detail = f"seg_sigma={self.seg_sigma}" if self.strategy == SEG else f"noise_scale={self.noise_scale}"
        return f"{self.strategy}, n_heads={self.n_heads}, new_order={self.new_order}, {detail}"


@contextlib.contextmanager
def perturbed_attention(model, drop_layers, strategy=PAG, noise_scale=1.0, seg_sigma=math.inf,
                        reproduce_rng=True, make_op=None):
    """Within this context, the named AttentionBlocks of ``model`` run a perturbed attention op.

    :param drop_layers: ``named_modules`` paths of AttentionBlocks (``middle_block.1``, ...).
    :param strategy: ``attention_mask_identity`` (PAG), ``attention_mask`` or ``seg`` (SEG).
    :param noise_scale: the masking probability of the two mask strategies (1.0: all
        off-diagonal logits).
    :param seg_sigma: SEG's blur sigma in tokens; ``> 9999`` (e.g. ``math.inf``): mean query.
    :param reproduce_rng: draw the original's ``th.rand`` masks also where they are fixed.
    :param make_op: ``make_op(name, original_op)`` -> the :class:`PerturbedAttention` to install
        (default: a new one with these settings; the fast path passes its own, cached).

    The original ops (and any hooks on them, e.g. a SAG probe) are back on exit.
    """
    check_perturbation(strategy, noise_scale, seg_sigma, guiding=False)
    layers = resolve_layers(model, drop_layers)
    swapped = []
    try:
        for name, block in layers:
            original = block.attention
            if isinstance(original, PerturbedAttention):
                raise RuntimeError(f"{name} is already perturbed (nested perturbed_attention?)")
            if make_op is None:
                op = PerturbedAttention(original.n_heads, op_layout(original) == "new", strategy,
                                        noise_scale, seg_sigma, reproduce_rng)
            else:
                op = make_op(name, original)
            hook = block.register_forward_pre_hook(op.record_grid) if strategy == SEG else None
            swapped.append((block, original, hook))
            block.attention = op
        yield
    finally:
        for block, original, hook in reversed(swapped):
            block.attention = original
            if hook is not None:
                hook.remove()


# ---------------------------------------------------------------------------------- guidance


class PerturbedAttentionGuidance(TwoPassGuidance):
    """PAG / SEG for one UNet, plugged into ``p_mean_variance(guidance=...)`` like SAG.

    :param model: the UNetModel to perturb (also when sampling goes through a wrapper function).
    :param guide_scale: 1 + the paper's scale (PAG's published 4.0 = paper 3; SEG's official
        ``seg_scale`` 3 = 4.0); 1.0 = no guidance, one UNet pass per step.
    :param drop_layers: AttentionBlock names; default: PAG's published ImageNet-256 layers, or
        ``middle_block.1`` for SEG.
    :param guidance_window: ``(start, end)``: guide respaced steps with ``start >= t >= end``
        (``t[0]`` decides); None: every step.
    :param strategy, noise_scale, seg_sigma, reproduce_rng: see :func:`perturbed_attention`.
    :param drop_layer_randomly: perturb one of ``drop_layers`` per guided step, drawn from a
        ``random.Random`` seeded with torch's initial seed (the global torch stream is untouched,
        so seeded batches stay reproducible and rank-independent).
    :param keep_intermediates: add ``pag`` (eps of both passes, guided eps, perturbed x_0,
        ``delta = guide_scale * (eps - eps_pert)``) to the step outputs.
    """

    make_op = None  # perturbed_attention's make_op; the fast path's subclass installs its own ops

    def __init__(self, model, guide_scale=4.0, drop_layers=None, guidance_window=None,
                 strategy=PAG, noise_scale=1.0, seg_sigma=math.inf, drop_layer_randomly=False,
                 reproduce_rng=True, keep_intermediates=False):
        super().__init__(guide_scale)
        self.strategy, self.noise_scale, self.seg_sigma = check_perturbation(strategy, noise_scale, seg_sigma)
        if drop_layers is None:
            drop_layers = SEG_DEFAULT_LAYERS if strategy == SEG else PAG_DEFAULT_LAYERS
        self.drop_layers = [name for name, _ in resolve_layers(model, drop_layers)]
        self.unet = model
        self.window = None if guidance_window is None else check_window(guidance_window)
        self.reproduce_rng = reproduce_rng
        self.drop_layer_randomly = drop_layer_randomly
        self.keep_intermediates = keep_intermediates
        self._layer_rng, self._layer_seed = None, None

    def active_at(self, step):
        return self.window is None or self.window[0] >= step >= self.window[1]

    def perturbation(self, layers=None):
        """The context in which the second pass runs (``layers``, default :meth:`step_layers`,
        perturbed)."""
        return perturbed_attention(self.unet, layers or self.step_layers(), self.strategy,
                                   self.noise_scale, self.seg_sigma, self.reproduce_rng, self.make_op)

    def step_layers(self):
        """The blocks one guided step perturbs (one random block with ``drop_layer_randomly``)."""
        return [self._random_layer()] if self.drop_layer_randomly else self.drop_layers

    def _random_layer(self):
        seed = th.initial_seed()
        if self._layer_seed != seed:
            self._layer_rng, self._layer_seed = random.Random(seed), seed
        return self._layer_rng.choice(self.drop_layers)

    def guide(self, diffusion, model, x, t, first, model_kwargs, clip_denoised, denoised_fn):
        """Turn the first pass's outputs into guided ones (see ``p_mean_variance``)."""
        eps = pass_eps(diffusion, first["model_output"], x, t, pred_xstart=first["pred_xstart"])
        self._before_second_pass(diffusion, x, t, model_kwargs)
        with self.perturbation():
            output = diffusion.run_model(model, x, t, model_kwargs)
        perturbed_x0 = None
        if self.keep_intermediates or diffusion.model_mean_type == ModelMeanType.PREVIOUS_X:
            perturbed_x0 = diffusion.outputs_from_model_output(
                output, x, t, clip_denoised, denoised_fn)["pred_xstart"]
        perturbed_eps = pass_eps(diffusion, output, x, t, clip_denoised, denoised_fn, perturbed_x0)
        out, guided_eps = guided_outputs(diffusion, first, eps, perturbed_eps, self.guide_scale,
                                         x, t, clip_denoised, denoised_fn)
        if self.keep_intermediates:
            out["pag"] = {"strategy": self.strategy, "eps": eps, "perturbed_eps": perturbed_eps,
                          "guided_eps": guided_eps, "perturbed_pred_xstart": perturbed_x0,
                          "delta": self.guide_scale * (eps - perturbed_eps)}
        return out

    def _before_second_pass(self, diffusion, x, t, model_kwargs):
        """Called just before the perturbed UNet pass (a faster subclass may start work here)."""


# ---------------------------------------------------------------------------------- guidance_kwargs


def parse_strategies(strategies):
    """``guidance_strategies`` (a dict or its JSON text) -> ``(strategy, (start, end))``.

    Exactly one strategy per run; a clear ValueError for malformed JSON, unknown names, two
    strategies (SAG and PAG together in particular) and bad windows.
    """
    example = '{"attention_mask_identity": [25, 0]}'
    if isinstance(strategies, str):
        try:
            strategies = json.loads(strategies)
        except ValueError as exc:
            raise ValueError(f"--guidance_strategies is not valid JSON ({exc}); "
                             f"expected e.g. '{example}'") from None
    if not isinstance(strategies, dict) or not strategies:
        raise ValueError(f"--guidance_strategies must be a JSON object with one strategy, e.g. "
                         f"'{example}', got {strategies!r}")
    names = list(strategies)
    if len(names) > 1:
        what = "SAG and PAG/SEG requested in one run" if SAG_STRATEGY in names else "two strategies at once"
        raise ValueError(f"--guidance_strategies: {what} ({', '.join(names)}); give exactly one")
    name = names[0]
    if name not in STRATEGIES + (SAG_STRATEGY,):
        raise ValueError(f"--guidance_strategies: unknown strategy {name!r}; supported: {PAG} (PAG), "
                         f"{MASK}, {SEG} (SEG), {SAG_STRATEGY} (SAG)")
    try:
        window = check_window(strategies[name])
    except ValueError as exc:
        raise ValueError(f"--guidance_strategies {name}: {exc}") from None
    return name, window


SAG_ONLY_KEYS = ("guide_start", "sel_attn_block", "sel_attn_depth", "sag_heads")


def guidance_from_kwargs(diffusion, unet, kwargs):
    """The samplers' ``guidance_kwargs`` with ``guidance_strategies`` as a guidance object.

    Keys: ``guidance_strategies`` (one of ``attention_mask_identity``, ``attention_mask``,
    ``seg``, or the PAG code's ``sag``, with its ``[start, end]`` window), ``guide_scale``,
    ``drop_layers``, ``noise_scale``, ``seg_sigma``, ``drop_layer_randomly``, ``reproduce_rng``,
    ``keep_intermediates``. The PAG code's ``blur_sigma`` (used only by ``sag``) and
    ``guide_schedule`` (None) are accepted.
    """
    kwargs = dict(kwargs)
    name, window = parse_strategies(kwargs.pop("guidance_strategies"))
    schedule = kwargs.pop("guide_schedule", None)
    if schedule not in (None, "constant"):
        raise ValueError(f"guide_schedule {schedule!r} is not supported (the original rejects it too)")
    blur_sigma = kwargs.pop("blur_sigma", None)
    if name == SAG_STRATEGY:
        from .sag import guidance_from_kwargs as sag_guidance

        if blur_sigma is not None:
            kwargs["blur_sigma"] = blur_sigma
        return sag_guidance(diffusion, unet, dict(kwargs, guidance_window=window))
    mixed = [key for key in SAG_ONLY_KEYS if key in kwargs]
    if mixed:
        raise ValueError(f"SAG and PAG/SEG requested in one run: {', '.join(mixed)} (SAG) with "
                         f"guidance_strategies {name}; use one guidance")
    return PerturbedAttentionGuidance(unet, strategy=name, guidance_window=window, **kwargs)
