"""Self-Attention Guidance (Hong et al., arXiv 2210.00939) for ADM / IDDPM UNets.

SAG is one small mechanism, separate from the model and from the samplers:

1. :class:`AttentionProbe` - a forward hook on one attention block's inner op that keeps the qkv
   tensor of the last UNet pass (the UNet itself knows nothing about SAG);
2. :func:`attention_colsum` / :func:`sag_mask` - the keys that receive more than average
   attention, as a 0/1 mask at image resolution;
3. :func:`gaussian_blur` / :func:`degrade` - blur the predicted x_0 inside the mask and re-noise
   it to step t with the predicted eps;
4. :class:`SelfAttentionGuidance` - runs the UNet again on that degraded input and pushes eps
   away from it: ``eps = eps_deg + s * (eps - eps_deg)``. It plugs into
   ``GaussianDiffusion.p_mean_variance(guidance=...)``, so DDPM and DDIM share it; what it
   shares with PAG / SEG (the eps combination, which eps, the window) is in ``guidance.py``.

Default behaviour reproduces the original SAG code bit-for-bit in float32 (checked
against vectors made by the original code, ``tests/reference/golden/sag``), including its quirks: the map is read with the ``--num_heads`` flag in
the legacy qkv layout (``sag_heads="reference"``), and every guided step consumes one draw of the
CPU random generator (torchvision's GaussianBlur drew its sigma), so seeded CPU runs give the
original's trajectories.
"""

import contextlib
import math
import weakref

import torch as th
import torch.nn.functional as F

from .guidance import (  # noqa: F401  (resolve_guidance: its old home)
    TwoPassGuidance, check_window, guided_outputs, pass_eps, resolve_guidance)
from .unet import AttentionBlock, QKVAttention

BLOCK_NAMES = ("input", "middle", "output")
SAG_HEADS = ("reference", "model")
BLUR_KERNEL_SIZE = 31  # fixed in the original for every resolution and sigma


# ---------------------------------------------------------------------------------- the probe


def attention_positions(model):
    """Every ``(block, depth)`` of ``model`` that holds an attention layer, in UNet order.

    ``middle`` is listed with depth 0 (the original ignores the depth for the middle block).
    """
    positions = []
    for depth, module in enumerate(model.input_blocks):
        if _attention_layer(module) is not None:
            positions.append(("input", depth))
    if _attention_layer(model.middle_block) is not None:
        positions.append(("middle", 0))
    for depth, module in enumerate(model.output_blocks):
        if _attention_layer(module) is not None:
            positions.append(("output", depth))
    return positions


def _attention_layer(container):
    return next((layer for layer in container if isinstance(layer, AttentionBlock)), None)


def find_attention_block(model, block, depth):
    """The AttentionBlock at ``(block, depth)``; a clear ValueError listing the valid choices."""
    def fail(reason):
        choices = ", ".join(f"{b} {d}" for b, d in attention_positions(model))
        raise ValueError(
            f"--sel_attn_block {block} --sel_attn_depth {depth}: {reason}; "
            f"valid (block depth) choices for this model: {choices}"
        )

    if block not in BLOCK_NAMES:
        fail(f"unknown block, expected one of {', '.join(BLOCK_NAMES)}")
    if block == "middle":
        container = model.middle_block
    else:
        blocks = model.input_blocks if block == "input" else model.output_blocks
        if not 0 <= int(depth) < len(blocks):
            fail(f"depth out of range 0..{len(blocks) - 1}")
        container = blocks[int(depth)]
    layer = _attention_layer(container)
    if layer is None:
        fail("that block has no attention layer")
    return layer


class AttentionProbe:
    """Keeps the qkv input of one attention block's inner op from the latest UNet pass."""

    def __init__(self, attention_block):
        self.block = attention_block
        self.qkv = None
        self.enabled = True
        self._handle = attention_block.attention.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        if self.enabled:
            self.qkv = inputs[0].detach()

    @contextlib.contextmanager
    def paused(self):
        """Ignore UNet passes inside this context (the degraded pass needs no map)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def take(self):
        """The captured qkv (float32) and forget it."""
        if self.qkv is None:
            raise RuntimeError("the attention probe captured nothing: was the probed UNet called?")
        qkv, self.qkv = self.qkv.float(), None
        return qkv

    def remove(self):
        self._handle.remove()
        self.qkv = None


# ---------------------------------------------------------------------------------- the mask


def attention_colsum(qkv, num_heads, layout="legacy", max_elements=1 << 26):
    """Total attention each key receives, averaged over heads: [B, T] (its mean over keys is 1).

    :param qkv: [B, 3*C, T] float32 input of the attention op.
    :param layout: "legacy" (per head ``[q|k|v]``) or "new" (``[Q_all|K_all|V_all]``).
    Computed as the original: softmax over keys of ``(q*s)^T (k*s)``, s = ch**-0.25, then mean
    over heads, then sum over queries; in batch chunks to bound memory.
    """
    bs, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {num_heads} heads")
    ch = width // (3 * num_heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    chunk = max(1, max_elements // (num_heads * length * length))
    sums = []
    for start in range(0, bs, chunk):
        part = qkv[start:start + chunk]
        b = part.shape[0]
        if layout == "legacy":
            q, k, _ = part.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, _ = (p.reshape(b * num_heads, ch, length) for p in part.chunk(3, dim=1))
        weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
        attn = th.softmax(weight.float(), dim=-1).type(weight.dtype)
        sums.append(map_colsum(attn, num_heads))
    return th.cat(sums, dim=0)


def map_colsum(attn_map, num_heads):
    """[B*heads, T, T] attention map -> [B, T]: mean over heads, then sum over queries."""
    length = attn_map.shape[-1]
    return attn_map.reshape(-1, num_heads, length, length).mean(dim=1).sum(dim=1)


def sag_mask(colsum, image_shape):
    """0/1 float mask [B, C, H, W]: keys with total attention > 1, nearest-upsampled.

    The map's resolution comes from the token count (row-major token order).
    """
    bs, tokens = colsum.shape
    res = math.isqrt(tokens)
    if res * res != tokens:
        raise ValueError(f"attention map with {tokens} tokens is not square")
    channels, height, width = image_shape[1:]
    mask = (colsum > 1.0).reshape(bs, 1, res, res).repeat(1, channels, 1, 1).int().float()
    return F.interpolate(mask, (height, width))


# ---------------------------------------------------------------------------------- blur and degrade


def gaussian_kernel1d(sigma, kernel_size=BLUR_KERNEL_SIZE):
    """Normalised float32 Gaussian taps on ``linspace(-(k-1)/2, (k-1)/2, k)``."""
    half = (kernel_size - 1) * 0.5
    x = th.linspace(-half, half, steps=kernel_size)
    pdf = th.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur(x, sigma, kernel_size=BLUR_KERNEL_SIZE):
    """Depthwise Gaussian blur with reflect padding, numerically torchvision's GaussianBlur.

    One 2-D convolution with the outer product of the 1-D kernels (a separable two-pass blur
    differs by float32 rounding).
    """
    return blur_with_kernel(x, blur_kernel2d(sigma, x.device, x.dtype, kernel_size))


def blur_kernel2d(sigma, device, dtype=th.float32, kernel_size=BLUR_KERNEL_SIZE):
    """The 2-D kernel: outer product (a float32 matmul) of the 1-D kernel with itself."""
    k1 = gaussian_kernel1d(sigma, kernel_size).to(device)
    return th.mm(k1[:, None], k1[None, :]).to(dtype)


def blur_with_kernel(x, kernel):
    """Reflect-pad and convolve every channel of ``x`` with the square 2-D ``kernel``."""
    kernel_size = kernel.shape[-1]
    pad = kernel_size // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(
            f"the {kernel_size}x{kernel_size} SAG blur needs images larger than {pad} pixels "
            f"per side (reflect padding), got {tuple(x.shape[-2:])}"
        )
    channels = x.shape[1]
    kernel = kernel.expand(channels, 1, kernel_size, kernel_size)
    padded = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def draw_blur_sigma(sigma):
    """The original's per-call sigma draw: one CPU uniform draw (it shifts the CPU stream)."""
    return th.empty(1).uniform_(sigma, sigma).item()


def degrade(diffusion, x0, t, eps, mask, blur_sigma, blur=gaussian_blur):
    """x̄_t: blur ``x0`` inside ``mask``, then re-noise it to step ``t`` with ``eps``.

    Returns (x_bar, blurred).
    """
    blurred = blur(x0, draw_blur_sigma(blur_sigma))
    blended = blurred * mask + x0 * (1 - mask)
    return diffusion.q_sample(blended, t, noise=eps), blurred


# ---------------------------------------------------------------------------------- guidance


class SelfAttentionGuidance(TwoPassGuidance):
    """SAG for one UNet: active on respaced steps ``t < guide_start`` when ``guide_scale != 1``.

    :param model: the UNetModel whose attention is probed (also when sampling goes through a
        wrapper function such as classifier_sample's ``model_fn``).
    :param sag_heads: "reference" - split the qkv with the ``--num_heads`` flag in the legacy
        layout, as the original (and its published numbers) did; "model" - the block's real
        heads and layout (the map the paper describes).
    :param guidance_window: optional ``(start, end)``: guide the respaced steps with
        ``start >= t >= end`` instead (the PAG code's ``{"sag": [start, end]}``).
    :param keep_intermediates: add the mask, blurred x_0 and degraded input to the step outputs.
    """

    def __init__(self, model, guide_scale=1.5, guide_start=250, blur_sigma=9.0,
                 sel_attn_block="output", sel_attn_depth=2, sag_heads="reference",
                 keep_intermediates=False, guidance_window=None):
        super().__init__(guide_scale)
        if not float(blur_sigma) > 0:
            raise ValueError(f"--blur_sigma must be positive, got {blur_sigma}")
        if sag_heads not in SAG_HEADS:
            raise ValueError(f"--sag_heads must be one of {', '.join(SAG_HEADS)}, got {sag_heads!r}")
        self.guide_start = int(guide_start)
        self.window = None if guidance_window is None else check_window(guidance_window)
        self.blur_sigma = float(blur_sigma)
        self.sag_heads = sag_heads
        self.keep_intermediates = keep_intermediates
        block = find_attention_block(model, sel_attn_block, sel_attn_depth)
        if sag_heads == "reference":
            self.num_heads, self.layout = model.num_heads, "legacy"
        else:
            self.num_heads = block.num_heads
            self.layout = getattr(block.attention, "layout", None) or (
                "new" if isinstance(block.attention, QKVAttention) else "legacy")
        self.probe = AttentionProbe(block)

    def active_at(self, step):
        """Whether respaced step ``step`` is guided."""
        if self.window is not None:
            return self.window[0] >= step >= self.window[1]
        return self.guide_start > step

    def guide(self, diffusion, model, x, t, first, model_kwargs, clip_denoised, denoised_fn):
        """Turn the first pass's outputs into guided ones (see ``p_mean_variance``)."""
        qkv = self.probe.take()
        eps1 = pass_eps(diffusion, first["model_output"], x, t, pred_xstart=first["pred_xstart"])
        with self._mask_and_blur_context(x):
            mask = sag_mask(self.colsum(qkv), x.shape)
            x_bar, blurred = degrade(diffusion, first["pred_xstart"], t, eps1, mask, self.blur_sigma,
                                     blur=self.blur)
        self._before_second_pass(diffusion, x, t, model_kwargs)
        with self._second_pass_context():
            output2 = diffusion.run_model(model, x_bar, t, model_kwargs)
        eps2 = pass_eps(diffusion, output2, x_bar, t, clip_denoised, denoised_fn)
        out, guided_eps = guided_outputs(diffusion, first, eps1, eps2, self.guide_scale, x, t,
                                         clip_denoised, denoised_fn)
        if self.keep_intermediates:
            out["sag"] = {"mask": mask, "blurred": blurred, "x_bar": x_bar, "eps": eps1,
                          "degraded_eps": eps2, "guided_eps": guided_eps}
        return out

    # Steps a faster subclass may replace (same numbers up to float32 rounding).

    def colsum(self, qkv):
        """Per-key attention column sums [B, T] of the captured qkv."""
        return attention_colsum(qkv, self.num_heads, self.layout)

    def blur(self, x, sigma):
        return gaussian_blur(x, sigma)

    def _mask_and_blur_context(self, x):
        return contextlib.nullcontext()

    def _second_pass_context(self):
        """Around the second (degraded) UNet pass: the probe ignores it."""
        return self.probe.paused()

    def _before_second_pass(self, diffusion, x, t, model_kwargs):
        """Called between the degradation and the second UNet pass."""

    def close(self):
        """Detach the probe from the model."""
        self.probe.remove()


def remember_sag_model(diffusion, model, sel_attn_block=None, sel_attn_depth=None):
    """Let ``guidance_kwargs`` calls find the UNet when the sampler gets a wrapper function.

    The original registered its hook in ``create_model_and_diffusion``; ours records which
    model and block to probe there and attaches the hook only while a sampler runs.
    """
    diffusion.sag_model_ref = weakref.ref(model)
    diffusion.sag_selection = (sel_attn_block or "output", 2 if sel_attn_depth is None else sel_attn_depth)


def guidance_from_kwargs(diffusion, unet, kwargs):
    """The original's ``guidance_kwargs`` dict (``guide_scale``, ``guide_start``, ``blur_sigma``,
    optionally ``sel_attn_block``, ``sel_attn_depth``, ``sag_heads``) as a SelfAttentionGuidance;
    the block defaults to the one ``create_model_and_diffusion`` was given."""
    kwargs = dict(kwargs)
    block, depth = getattr(diffusion, "sag_selection", ("output", 2))
    kwargs.setdefault("sel_attn_block", block)
    kwargs.setdefault("sel_attn_depth", depth)
    return SelfAttentionGuidance(unet, **kwargs)
