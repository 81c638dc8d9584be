"""The opt-in fast sampling path: SDPA attention, autocast, TF32, channels_last, torch.compile,
and the guidances' fast variants (SAG; PAG / SEG, see "PAG / SEG" below).

Nothing here changes the exact path: with :func:`fast_path_defaults` every option is off and
:func:`prepare_model` leaves the model untouched (it only forbids TF32, which PyTorch allows in
cuDNN convolutions by default, so the exact path is float32 on GPUs too). A driver adds the
flags and calls::

    add_dict_to_argparser(parser, fast_path_defaults())
    model = prepare_model(model, **fast_path_flags(args))          # after load / use_fp16 / eval
    SAG = sag_class(**fast_path_flags(args))                      # SelfAttentionGuidance or fast
    guidance = SAG(model, guide_scale=..., ...)                    # same arguments as before
    PAG = pag_class(**fast_path_flags(args))                      # PerturbedAttentionGuidance or fast

Precision: ``--use_fp16 True`` (OpenAI's fp16 torso) is untouched; ``--dtype bf16|fp16`` runs
the UNet under autocast and hands the sampler a float32 output, so the diffusion arithmetic,
the SAG mask, blur and degradation stay float32.
"""

import contextlib
import functools

import torch as th
import torch.nn.functional as F

from .fast_attention import (
    attention_colsum_chunked,
    mean_query_attention,
    merge_heads,
    op_layout,
    split_qkv,
    use_sdpa_attention,
    value_rows,
)
from .pag import (
    MASK,
    PAG,
    SEG,
    SEG_INFINITE_SIGMA,
    PerturbedAttention,
    PerturbedAttentionGuidance,
    attention_layers,
    check_square_grid,
    seg_blur_queries,
    seg_kernel2d,
)
from .sag import BLUR_KERNEL_SIZE, SelfAttentionGuidance, blur_kernel2d, blur_with_kernel

DTYPES = {"fp32": None, "bf16": th.bfloat16, "fp16": th.float16}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


def fast_path_defaults():
    """The fast-path flags; these defaults keep the exact (reference) path."""
    return dict(
        fast_attention=False,  # SDPA attention ops + chunked SAG colsum + sync-free SAG step
        dtype="fp32",  # fp32 | bf16 | fp16: autocast of the UNet (not --use_fp16's torso cast)
        allow_tf32=False,  # TF32 matmuls / convolutions on Ampere+ GPUs (False: forbidden)
        channels_last=False,  # NHWC convolutions
        compile=False,  # torch.compile the UNet forward
        compile_mode="default",  # see COMPILE_MODES
        cuda_graphs=False,  # CUDA graphs for the fixed-shape UNet call (implies compile)
    )


def fast_path_flags(args):
    """The fast-path entries of an argparse namespace (or dict) as keyword arguments."""
    get = args.get if isinstance(args, dict) else functools.partial(getattr, args)
    return {key: get(key, default) for key, default in fast_path_defaults().items()}


def _precision_names():
    """Whether this torch sets TF32 through ``fp32_precision`` names (else ``allow_tf32`` booleans)."""
    try:
        return hasattr(th.backends.cuda.matmul, "fp32_precision")
    except AssertionError:  # torch <= 2.3: the cuBLAS settings raise this for unknown names
        return False


def set_tf32(enabled):
    """Allow (or forbid) TF32 for float32 matmuls and cuDNN convolutions."""
    setting = ("tf32" if enabled else "ieee") if _precision_names() else bool(enabled)
    _write_tf32_state((setting, setting))


def _tf32_state():
    """(matmul, convolution) TF32 settings as stored: precision names, or booleans (older torch)."""
    if _precision_names():  # torch.backends.cudnn.conv exists only with them
        return th.backends.cuda.matmul.fp32_precision, th.backends.cudnn.conv.fp32_precision
    return th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32


def _write_tf32_state(state):
    """Store a :func:`_tf32_state` pair back."""
    if _precision_names():
        th.backends.cuda.matmul.fp32_precision, th.backends.cudnn.conv.fp32_precision = state
    else:
        th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32 = state


def tf32_enabled():
    """Whether float32 matmuls and cuDNN convolutions may both use TF32."""
    return all(setting in ("tf32", True) for setting in _tf32_state())


@contextlib.contextmanager
def tf32_mode(enabled):
    """Run a block with TF32 allowed or forbidden, then restore the previous settings exactly
    (TF32 is process-wide: this lets an exact and a TF32 path alternate in one process)."""
    before = _tf32_state()
    set_tf32(enabled)
    try:
        yield
    finally:
        _write_tf32_state(before)


def prepare_model(model, fast_attention=False, dtype="fp32", allow_tf32=False, channels_last=False,
                  compile=False, compile_mode="default", cuda_graphs=False):
    """Apply the fast-path options to ``model`` in place and return it (state_dict unchanged).

    Call after loading weights (and ``convert_to_fp16`` / ``eval``), before any SAG probe is
    attached. With the defaults the model is left as it is, and TF32 is forbidden process-wide
    (PyTorch's own default allows it in cuDNN convolutions on Ampere+ GPUs, which would make the
    "exact float32" path TF32 in its convolutions).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    # PyTorch lets cuDNN convolutions use TF32 by default: the exact path forbids it explicitly.
    set_tf32(allow_tf32)
    if fast_attention:
        use_sdpa_attention(model)
    if channels_last:
        model.to(memory_format=th.channels_last)
    if DTYPES[dtype] is None and not channels_last and not compile and not cuda_graphs:
        return model
    if getattr(model, "_fast_path_forward", None) is not None:
        raise RuntimeError("prepare_model was already applied to this model")
    forward = _fast_forward(type(model).forward.__get__(model), DTYPES[dtype], channels_last)
    call = forward
    if compile or cuda_graphs:
        # The SAG probe attaches its hook after compilation: make dynamo guard on hooks.
        th._dynamo.config.skip_nnmodule_hook_guards = False
        mode = "reduce-overhead" if cuda_graphs else compile_mode
        call = th.compile(forward, mode=mode, dynamic=False)
        if cuda_graphs:
            call = _CudaGraphCall(call)
    model._fast_path_forward = forward
    model.forward = call  # instance attribute: parameters, buffers and hooks are unaffected
    return model


def _fast_forward(forward, dtype, channels_last):
    """The UNet forward under autocast (float32 result) with optional NHWC input."""

    def fast_forward(x, timesteps, *args, **kwargs):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=th.channels_last)
        if dtype is None:
            return forward(x, timesteps, *args, **kwargs)
        with th.autocast(device_type=x.device.type, dtype=dtype):
            out = forward(x, timesteps, *args, **kwargs)
        return out.float()

    return fast_forward


class _CudaGraphCall:
    """CUDA-graph ("reduce-overhead") UNet call that is safe for SAG's two passes per step.

    Every call starts a new cudagraph-tree step and copies the output out of the graph pool, so
    the first pass's eps survives the second pass. The probed qkv is consumed (mask computed)
    before the second pass, as :class:`FastSelfAttentionGuidance` does. Untested without a GPU.
    """

    def __init__(self, call):
        self.call = call

    def __call__(self, *args, **kwargs):
        th.compiler.cudagraph_mark_step_begin()
        return self.call(*args, **kwargs).clone()


# ---------------------------------------------------------------------------------- SAG


class _PrefetchesClassifierGradient:
    """What the fast guidances share: ``overlap`` (a :class:`ClassifierGradientOverlap`, or
    None) starts the classifier gradient just before the second UNet pass (see pair_overlap)."""

    overlap = None

    def _before_second_pass(self, diffusion, x, t, model_kwargs):
        if self.overlap is not None:
            self.overlap.prefetch(diffusion, x, t, model_kwargs)


class FastSelfAttentionGuidance(_PrefetchesClassifierGradient, SelfAttentionGuidance):
    """SelfAttentionGuidance for the fast path; same arguments, same step semantics.

    Differences from the exact class: the chunked float32 colsum (equal within ~1e-6, so masks
    differ only at keys whose column sum is within rounding of 1), the blur kernel cached on the
    device (bit-identical blur, no host-to-device copy per step), mask and blur computed with
    autocast off, no device sync in :meth:`is_active` when the loop sets :attr:`step_hint`, the
    probe left on in the second pass (one compiled graph, not two), and optional overlap of the
    classifier gradient with the second UNet pass (``overlap``).
    """

    def __init__(self, model, *args, colsum_max_elements=1 << 24, overlap=None, **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.sag_heads == "model":  # the block may hold an SDPAAttention op
            self.layout = op_layout(self.probe.block.attention)
        self.colsum_max_elements = colsum_max_elements
        self.overlap = overlap
        self._kernels = {}

    def colsum(self, qkv):
        return attention_colsum_chunked(qkv, self.num_heads, self.layout, self.colsum_max_elements)

    def blur(self, x, sigma):
        """``sag.gaussian_blur`` with the 2-D kernel built once per (sigma, device, dtype)."""
        key = (sigma, x.device, x.dtype)
        if key not in self._kernels:
            self._kernels[key] = blur_kernel2d(sigma, x.device, x.dtype, BLUR_KERNEL_SIZE)
        return blur_with_kernel(x, self._kernels[key])

    def _mask_and_blur_context(self, x):
        return _no_autocast(x.device.type)

    def _second_pass_context(self):
        """The probe stays on in the second pass: a compiled UNet guards on the probe's on/off
        flag, so pausing it would trace and compile the whole UNet a second time. What the
        second pass captures is never read (each step takes the first pass's qkv before its
        second pass; the next first pass replaces it)."""
        return contextlib.nullcontext()


def sag_class(fast_attention=False, **_flags):
    """The guidance class for these fast-path flags (the exact one unless ``fast_attention``)."""
    return FastSelfAttentionGuidance if fast_attention else SelfAttentionGuidance


# ---------------------------------------------------------------------------------- PAG / SEG


class FastPerturbedAttention(PerturbedAttention):
    """:class:`~guided_diffusion.pag.PerturbedAttention` with less work; same input and output
    (up to float rounding), same semantics.

    * PAG with ``noise_scale`` 1 (the identity map): the output is v, sliced out of qkv; no q, k,
      logits or softmax (bit-identical to the exact op). This op draws nothing: the original's
      mask draws are made by :class:`FastPerturbedAttentionGuidance` before the pass.
    * SEG with sigma = inf: every query is its head's mean query, so every row of the map is the
      same: one row per head is attended and broadcast over the tokens.
    * SEG with a finite sigma: the exact query blur (kernel cached per grid, device, dtype), SDPA.
    * Random masks (``noise_scale`` < 1): the exact op's draw and mask, SDPA with that mask; a row
      masked completely (``attention_mask`` only) is NaN, as in the exact op.

    :param perturb_from: perturb only the samples from this batch index on; those before it get
        the plain attention (both passes of a guided step as one batch: see
        ``scripts/benchmark_sampling.py``, which measures whether that pays).
    """

    def __init__(self, *args, perturb_from=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = "new" if self.new_order else "legacy"
        self.perturb_from = perturb_from
        self._kernels = {}

    def forward(self, qkv):
        if self.perturb_from:
            plain = merge_heads(F.scaled_dot_product_attention(
                *split_qkv(qkv[:self.perturb_from], self.n_heads, self.layout)))
            return th.cat([plain, self.perturbed(qkv[self.perturb_from:])])
        return self.perturbed(qkv)

    def perturbed(self, qkv):
        if self.strategy == PAG and self.noise_scale == 1.0:
            return value_rows(qkv, self.n_heads, self.layout)
        if self.strategy == SEG and self.seg_sigma > SEG_INFINITE_SIGMA:
            check_square_grid(self.grid)  # the exact op's error on a non-square grid
            return mean_query_attention(qkv, self.n_heads, self.layout)
        q, k, v = split_qkv(qkv, self.n_heads, self.layout)  # [B, H, T, C]
        if self.strategy == SEG:
            return merge_heads(F.scaled_dot_product_attention(self.blurred(q), k, v))
        bs, heads, length, _ = q.shape
        mask = self.logit_mask((bs * heads, length, length), qkv.device).view(bs, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)  # True: takes part
        if self.strategy == MASK:  # a row without any logit: the exact softmax gives NaN
            out = out.masked_fill(mask.all(dim=-1, keepdim=True), float("nan"))
        return merge_heads(out)

    def blurred(self, q):
        """SEG's blur of the [B, H, T, C] queries over the block's grid, as the exact op's."""
        bs, heads, length, ch = q.shape
        check_square_grid(self.grid)
        key = (self.grid, q.device, q.dtype)
        if key not in self._kernels:
            self._kernels[key] = seg_kernel2d(self.seg_sigma, self.grid[1], q.device, q.dtype)
        flat = q.transpose(2, 3).reshape(bs * heads, ch, length)
        out = seg_blur_queries(flat, self.grid, self.seg_sigma, self._kernels[key])
        return out.reshape(bs, heads, ch, length).transpose(2, 3)


class FastPerturbedAttentionGuidance(_PrefetchesClassifierGradient, PerturbedAttentionGuidance):
    """PerturbedAttentionGuidance (PAG / SEG) for the fast path; same arguments, same steps.

    Differences from the exact class: the perturbed blocks run :class:`FastPerturbedAttention`
    (built once per block, so a compiled UNet traces one graph per pass, plus one once for the
    step that builds SEG's finite-sigma kernel); with PAG's
    identity map the original's ``th.rand`` mask draws (``reproduce_rng``, the default) are made
    just before the perturbed pass, same shapes, same generator, same order, values unused, so
    the random stream - and seeded DDPM samples - stay those of the exact path, and the UNet
    forward itself draws nothing (a compiled graph holds no random op); optional overlap of the
    classifier gradient with the perturbed pass (``overlap``).
    """

    def __init__(self, model, *args, overlap=None, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.overlap = overlap
        self._ops = {}
        self._layers = None  # the blocks of the coming perturbed pass
        layers = attention_layers(model)
        order = list(layers)
        # name -> (forward position, heads, downsampling factor of its token grid)
        self._mask_shapes = {
            name: (order.index(name), layers[name][0].num_heads,
                   model.image_size // layers[name][1] if layers[name][1] else None)
            for name in self.drop_layers}

    def draws_unused_masks(self):
        """Whether a perturbed pass consumes the original's mask draws without needing them."""
        return self.strategy == PAG and self.noise_scale == 1.0 and self.reproduce_rng

    def make_op(self, name, original):
        if name not in self._ops:
            self._ops[name] = FastPerturbedAttention(
                original.n_heads, op_layout(original) == "new", self.strategy, self.noise_scale,
                self.seg_sigma, self.reproduce_rng)
        return self._ops[name]

    def _before_second_pass(self, diffusion, x, t, model_kwargs):
        self._layers = self.step_layers()
        if self.draws_unused_masks():
            self.draw_masks(self._layers, x)
        super()._before_second_pass(diffusion, x, t, model_kwargs)

    def draw_masks(self, layers, x):
        """The exact op's ``th.rand((B*heads, T, T))`` of each layer, in forward order."""
        for name in sorted(layers, key=lambda n: self._mask_shapes[n][0]):
            _, heads, factor = self._mask_shapes[name]
            if factor is None:
                raise ValueError(f"{name}: token grid unknown (the model has no image_size)")
            tokens = (x.shape[-2] // factor) * (x.shape[-1] // factor)
            th.rand((x.shape[0] * heads, tokens, tokens), device=x.device)

    def perturbation(self, layers=None):
        layers = layers or self._layers
        self._layers = None
        return super().perturbation(layers)


def pag_class(fast_attention=False, **_flags):
    """The PAG / SEG guidance class for these fast-path flags (exact unless ``fast_attention``)."""
    return FastPerturbedAttentionGuidance if fast_attention else PerturbedAttentionGuidance


def _no_autocast(device_type):
    if _autocast_enabled(device_type):
        return th.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(device_type):
    if hasattr(th.amp, "is_autocast_available"):  # torch >= 2.4: any device type
        return th.amp.is_autocast_available(device_type) and th.is_autocast_enabled(device_type)
    return {"cuda": th.is_autocast_enabled, "cpu": th.is_autocast_cpu_enabled}.get(device_type, bool)()


# ---------------------------------------------------------------------------------- classifier overlap


class ClassifierGradientOverlap:
    """A ``cond_fn`` whose gradient at x_t is computed while SAG's second UNet pass runs.

    Pass it as the sampler's ``cond_fn`` and as ``FastSelfAttentionGuidance(overlap=...)``. On a
    guided step the guidance calls :meth:`prefetch` just before the second pass: on CUDA the
    classifier gradient is launched on a side stream, concurrently with that pass; the sampler's
    later call for the same ``x`` waits for it and returns it. The gradient is the same
    computation as calling ``cond_fn`` directly (it depends only on x_t, t and y). On other
    devices, or on unguided steps, it simply calls ``cond_fn``.
    """

    def __init__(self, cond_fn):
        self.cond_fn = cond_fn
        self._pending = None  # (x, gradient, stream)
        self._stream = None

    def prefetch(self, diffusion, x, t, model_kwargs):
        """Start ``cond_fn`` at (x, t) as the sampler will call it (timesteps mapped)."""
        stream = None
        if x.is_cuda:
            if self._stream is None or self._stream.device != x.device:
                self._stream = th.cuda.Stream(device=x.device)
            stream = self._stream
            stream.wait_stream(th.cuda.current_stream(x.device))
            x.record_stream(stream)
        with th.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            grad = diffusion._wrap_model(self.cond_fn)(
                x, diffusion._scale_timesteps(t), **(model_kwargs or {}))
        self._pending = (x, grad, stream)

    def __call__(self, x, t, **kwargs):
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is x:
            _, grad, stream = pending
            if stream is not None:
                current = th.cuda.current_stream(x.device)
                current.wait_stream(stream)
                grad.record_stream(current)
            return grad
        return self.cond_fn(x, t, **kwargs)


def pair_overlap(guidance, cond_fn):
    """Let ``guidance`` prefetch the classifier gradient only when ``cond_fn`` (the sampler's, for
    the coming run) is a :class:`ClassifierGradientOverlap`: a guidance object reused for a run
    without classifier guidance must not compute gradients nobody reads."""
    if isinstance(guidance, _PrefetchesClassifierGradient):
        guidance.overlap = cond_fn if isinstance(cond_fn, ClassifierGradientOverlap) else None
