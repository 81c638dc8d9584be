"""Strict checkpoint loading that explains, in one line, why a checkpoint does not fit the flags."""

import os
import re

import torch as th

from . import dist_util


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not match the model built from the flags."""


# Flag names per network kind: UNetModel (diffusion) or EncoderUNetModel (classifier).
_FLAGS = {
    "model": dict(width="--num_channels", depth="--num_res_blocks", attn="--attention_resolutions",
                  updown="--resblock_updown", ssn="--use_scale_shift_norm", size="--image_size",
                  mult="--channel_mult", path="--model_path"),
    "classifier": dict(width="--classifier_width", depth="--classifier_depth",
                       attn="--classifier_attention_resolutions", updown="--classifier_resblock_updown",
                       ssn="--classifier_use_scale_shift_norm", size="--image_size",
                       mult="--image_size", path="--classifier_path"),
}


def read_state_dict(path, what="model"):
    """The state dict stored at ``path``; CheckpointError (one line) when absent or unreadable."""
    flag = _FLAGS[what]["path"]
    if not path:
        raise CheckpointError(f"no {what} checkpoint given (pass {flag} PATH)")
    path = os.fspath(path)
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError(f"{what} checkpoint not found: {path} ({flag})")
    try:
        state = dist_util.load_state_dict(path, map_location="cpu")
    except Exception as exc:  # pickle, zip, weights_only and I/O errors all end here
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {what} checkpoint {path}: {type(exc).__name__}: {first}")
    if not isinstance(state, dict) or not all(th.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{what} checkpoint {path} does not hold a state dict of tensors")
    return state


def load_checkpoint(module, path, what="model", assign=False):
    """Strictly load ``path`` into ``module``; raise CheckpointError describing any mismatch.

    ``assign=True`` makes the module use the loaded tensors (for modules built on the meta device).
    """
    state = read_state_dict(path, what)
    problem = describe_mismatch(module, state, what)
    if problem:
        raise CheckpointError(f"{what} checkpoint {path} does not match the flags: {problem}")
    module.load_state_dict(state, strict=True, assign=assign)
    return module


def describe_mismatch(module, state, what="model"):
    """'' when ``state`` fits ``module`` exactly, else one line: differing keys/shapes + likely flag."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [(k, theirs[k], own[k]) for k in own if k in theirs and own[k] != theirs[k]]
    if not (missing or unexpected or shapes):
        return ""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if shapes:
        shown = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes[:2])
        more = f", +{len(shapes) - 2} more" if len(shapes) > 2 else ""
        parts.append(f"{len(shapes)} shapes differ ({shown}{more})")
    hint = likely_flag(module, missing, unexpected, shapes, theirs, what)
    return "; ".join(parts) + (f"; likely cause: {hint}" if hint else "")


def _first(keys, n=3):
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _block_count(keys, prefix):
    idx = {int(m.group(1)) for k in keys for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def likely_flag(module, missing, unexpected, shapes, theirs, what="model"):
    """Best guess at the flag that explains a mismatch, e.g. '--class_cond True'."""
    f = _FLAGS[what]
    odd = missing + unexpected
    shape_of = {k: (a, b) for k, a, b in shapes}
    if what == "model":
        if "label_emb.weight" in missing:
            return "--class_cond False (the checkpoint is unconditional)"
        if "label_emb.weight" in unexpected:
            return "--class_cond True (the checkpoint is class-conditional)"
        if "out.2.weight" in shape_of and shape_of["out.2.weight"][0][1:] == shape_of["out.2.weight"][1][1:]:
            learned = shape_of["out.2.weight"][0][0] == 2 * shape_of["out.2.weight"][1][0]
            return f"--learn_sigma {learned} (checkpoint outputs {shape_of['out.2.weight'][0][0]} channels)"
    elif any(k.startswith("out.") for k in odd):
        return "--classifier_pool (the checkpoint's output head differs)"
    n_ckpt, n_own = _block_count(theirs, "input_blocks"), _block_count(module.state_dict(), "input_blocks")
    if n_ckpt != n_own:
        levels = len(getattr(module, "channel_mult", ())) or 1
        nrb = getattr(module, "num_res_blocks", 0)
        if n_ckpt % levels == 0 and n_ckpt // levels - 1 != nrb:
            return f"{f['depth']} {n_ckpt // levels - 1} (checkpoint has {n_ckpt} input blocks, flags give {n_own})"
        return f"{f['size']} / {f['mult']} (checkpoint has {n_ckpt} input blocks, flags give {n_own})"
    if "time_embed.0.weight" in shape_of:
        return f"{f['width']} {shape_of['time_embed.0.weight'][0][1]}"
    ssn = [k for k in shape_of if k.endswith("emb_layers.1.weight")]
    if ssn and shape_of[ssn[0]][0][0] in (2 * shape_of[ssn[0]][1][0], shape_of[ssn[0]][1][0] // 2):
        return f"{f['ssn']} {shape_of[ssn[0]][0][0] > shape_of[ssn[0]][1][0]}"
    if any(".op." in k or re.search(r"\.\d+\.conv\.", k) for k in odd):
        return f"{f['updown']} (down/upsampling layers differ)"
    if any(re.search(r"\.(qkv|proj_out)\.", k) for k in odd):
        return f"{f['attn']} (attention layers differ at some resolution)"
    if shapes:
        return f"{f['mult']} / {f['size']} (channel widths differ)"
    return ""
