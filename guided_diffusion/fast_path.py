"""The opt-in fast sampling path: SDPA attention, autocast, TF32, channels_last, torch.compile.

Nothing here changes the exact path: with :func:`fast_path_defaults` every option is off and
:func:`prepare_model` leaves the model untouched (it only forbids TF32, which PyTorch allows in
cuDNN convolutions by default, so the exact path is float32 on GPUs too). A driver adds the
flags and calls::

    add_dict_to_argparser(parser, fast_path_defaults())
    model = prepare_model(model, **fast_path_flags(args))          # after load / use_fp16 / eval
    SAG = sag_class(**fast_path_flags(args))                      # SelfAttentionGuidance or fast
    guidance = SAG(model, guide_scale=..., ...)                    # same arguments as before

Precision: ``--use_fp16 True`` (OpenAI's fp16 torso) is untouched; ``--dtype bf16|fp16`` runs
the UNet under autocast and hands the sampler a float32 output, so the diffusion arithmetic,
the SAG mask, blur and degradation stay float32.
"""

import contextlib
import functools

import torch as th

from .fast_attention import attention_colsum_chunked, op_layout, use_sdpa_attention
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


class FastSelfAttentionGuidance(SelfAttentionGuidance):
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

    def _before_second_pass(self, diffusion, x, t, model_kwargs):
        if self.overlap is not None:
            self.overlap.prefetch(diffusion, x, t, model_kwargs)


def sag_class(fast_attention=False, **_flags):
    """The guidance class for these fast-path flags (the exact one unless ``fast_attention``)."""
    return FastSelfAttentionGuidance if fast_attention else SelfAttentionGuidance


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
    if isinstance(guidance, FastSelfAttentionGuidance):
        guidance.overlap = cond_fn if isinstance(cond_fn, ClassifierGradientOverlap) else None
