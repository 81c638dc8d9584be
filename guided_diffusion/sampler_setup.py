"""What sampling one batch needs: the networks loaded from their checkpoints, the guidance, the
classifier's ``cond_fn``, the per-batch seed, and :func:`sample_batch` itself.

Batch ``b`` is sampled from the seed ``batch_seed(seed, b)`` (labels, then initial noise, then
the sampler's own draws), so the samples do not depend on which rank, process or launcher makes
them.
"""

import contextlib
import os

import numpy as np
import torch as th
import torch.nn.functional as F

from . import dist_util, faults, pag_flags
from .checkpoint_util import load_checkpoint
from .fast_path import ClassifierGradientOverlap, fast_path_flags, pair_overlap, prepare_model, sag_class
from .image_io import to_uint8_nhwc
from .sample_flags import UsageError
from .sampler_choice import sampling_loop


def batch_seed(seed, batch):
    """Seed of global batch ``batch``: splitmix64 of ``seed * 2**32 + batch``, as a 63-bit int.

    Plain integer arithmetic (no ``hash``), identical on every rank, process and machine.
    """
    mask = (1 << 64) - 1
    z = ((seed << 32) + batch + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


def random_seed():
    return int.from_bytes(os.urandom(4), "little") >> 1


def labels_drawn(args, kind):
    """Whether batches draw class labels (classifier_sample.py always does, as the original)."""
    return kind == "classifier" or args.class_cond


def _factory_args(args, keys):
    return {k: getattr(args, k) for k in keys}


# Building on the meta device skips random initialisation (seconds for the 128-512 models) but
# its first use imports torch's compiler stack (~2 s): it pays only for large checkpoints.
META_BUILD_MIN_BYTES = 64 << 20


def _load_network(build, path, what, use_fp16):
    """Build a network (on the meta device for large checkpoints), strictly load ``path``, move it
    to the device, convert to fp16 if asked and switch to eval mode."""
    large = os.path.isfile(path) and os.path.getsize(path) >= META_BUILD_MIN_BYTES
    with th.device("meta") if large else contextlib.nullcontext():
        net = build()
    load_checkpoint(net, path, what, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        net = build()  # some tensor lives outside the state dict: build it for real
        load_checkpoint(net, path, what)
    net = net.float().to(dist_util.dev())
    if use_fp16:
        net.convert_to_fp16()
    return net.eval()


def classifier_cond_fn(classifier, scale):
    """Classifier guidance's ``cond_fn``: ``scale`` * grad_x log p(y | x_t) (OpenAI's)."""

    def cond_fn(x, t, y=None):
        assert y is not None
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def build_sampler(args, kind):
    """Everything a batch needs: ``(diffusion, model_fn, cond_fn, guidance)``."""
    from . import script_util as su

    model_keys = su.model_and_diffusion_defaults().keys()
    model_box = {}

    def build_model():
        try:
            model_box["model"], model_box["diffusion"] = su.create_model_and_diffusion(
                **_factory_args(args, model_keys))
        except (ValueError, AssertionError) as exc:  # e.g. --timestep_respacing, --image_size
            raise UsageError(f"invalid model/diffusion flags: {exc}")
        return model_box["model"]

    model = _load_network(build_model, args.model_path, "model", args.use_fp16)
    fast = fast_path_flags(args)
    model = prepare_model(model, **fast)
    diffusion = model_box["diffusion"]
    try:
        guidance = pag_flags.build_guidance(args, model, fast) or sag_class(**fast)(
            model, guide_scale=args.guide_scale, guide_start=args.guide_start,
            blur_sigma=args.blur_sigma, sel_attn_block=args.sel_attn_block,
            sel_attn_depth=args.sel_attn_depth, sag_heads=args.sag_heads)
    except ValueError as exc:
        raise UsageError(str(exc).strip().splitlines()[0])
    if kind == "image":
        return diffusion, model, None, guidance

    def model_fn(x, t, y=None):
        assert y is not None
        return model(x, t, y if args.class_cond else None)

    if not args.classifier_guidance:  # the classifier is loaded only when it is used
        return diffusion, model_fn, None, guidance
    classifier = _load_network(
        lambda: su.create_classifier(**_factory_args(args, su.classifier_defaults().keys())),
        args.classifier_path, "classifier", args.classifier_use_fp16)
    # The classifier shares the UNet's attention kernels, autocast and memory layout (it is
    # differentiated every step, so it is not compiled).
    classifier = prepare_model(classifier, **dict(fast, compile=False, cuda_graphs=False))
    cond_fn = classifier_cond_fn(classifier, args.classifier_scale)
    if fast["fast_attention"]:  # on CUDA: classifier gradient concurrent with SAG's second pass
        cond_fn = ClassifierGradientOverlap(cond_fn)
        pair_overlap(guidance, cond_fn)
    return diffusion, model_fn, cond_fn, guidance


def sample_batch(args, sampler, batch, draws_labels):
    """Sample global batch ``batch``: labels, then initial noise, then the loop, all from
    ``batch_seed(args.seed, batch)``.  Returns uint8 NHWC images and int64 labels (or None)."""
    diffusion, model_fn, cond_fn, guidance = sampler
    device = dist_util.dev()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    th.manual_seed(batch_seed(args.seed, batch))
    model_kwargs, labels = {}, None
    if draws_labels:
        classes = th.randint(0, args.num_classes, (args.batch_size,), device=device)
        model_kwargs["y"] = classes
        labels = classes.cpu().numpy().astype(np.int64)
    noise = th.randn(*shape, device=device)
    loop = sampling_loop(diffusion, args, progressive=True)  # --sampler / --use_ddim
    for out in loop(model_fn, shape, noise=noise, clip_denoised=args.clip_denoised,
                    model_kwargs=model_kwargs, cond_fn=cond_fn, device=device,
                    progress=args.step_progress and dist_util.get_rank() == 0, guidance=guidance):
        faults.point("step")
    return to_uint8_nhwc(out["sample"]), labels
