"""Fast attention for the ADM UNet: an SDPA drop-in for the ``.attention`` op, and a lean colsum.

* :class:`SDPAAttention` replaces ``QKVAttentionLegacy`` / ``QKVAttention`` (parameter-free ops)
  with ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
  GPU). It stays the block's ``.attention`` attribute and receives the qkv tensor as its input,
  so SAG's :class:`~guided_diffusion.sag.AttentionProbe` keeps working unchanged.
* :func:`attention_colsum_chunked` - :func:`~guided_diffusion.sag.attention_colsum` computed in
  query chunks with an fp32 softmax: never materialises the full ``[B*heads, T, T]`` map.
* Shortcuts for perturbed attention (PAG / SEG, see ``fast_path.FastPerturbedAttention``):
  :func:`value_rows` (an identity attention map outputs v: nothing to compute) and
  :func:`mean_query_attention` (one query per head when every query is the mean query).
"""

import math

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .unet import AttentionBlock, QKVAttention, QKVAttentionLegacy

LAYOUTS = ("legacy", "new")


def split_qkv(qkv, num_heads, layout):
    """[B, 3*H*C, T] qkv -> q, k, v as [B, H, T, C] views with unit stride on the last axis."""
    bs, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {num_heads} heads")
    ch = width // (3 * num_heads)
    tokens = qkv.transpose(1, 2).contiguous()  # [B, T, 3*H*C]: one copy, channels last
    if layout == "legacy":  # channel = h*3C + j*C + c
        parts = tokens.view(bs, length, num_heads, 3, ch).unbind(3)
    elif layout == "new":  # channel = j*H*C + h*C + c
        parts = tokens.view(bs, length, 3, num_heads, ch).unbind(2)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return tuple(p.transpose(1, 2) for p in parts)


def merge_heads(out):
    """[B, H, T, C] attention output -> [B, H*C, T] with channel ``h*C + c`` (the ops' output)."""
    bs, heads, length, ch = out.shape
    return out.permute(0, 1, 3, 2).reshape(bs, heads * ch, length)


def value_rows(qkv, num_heads, layout):
    """The attention output for an identity attention map (every query attends only to itself):
    v itself, as [B, H*C, T] with channel ``h*C + c``; no q, no k, no softmax."""
    bs, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {num_heads} heads")
    ch = width // (3 * num_heads)
    if layout == "legacy":  # head h owns rows [3Ch, 3C(h+1)) = q | k | v
        return qkv.reshape(bs, num_heads, 3 * ch, length)[:, :, 2 * ch:].reshape(bs, num_heads * ch, length)
    if layout == "new":  # rows [2HC, 3HC) are every head's v, head-major
        return qkv[:, 2 * num_heads * ch:]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def mean_query_attention(qkv, num_heads, layout):
    """Attention with every query replaced by its head's mean query over the tokens (SEG's
    sigma = inf): every row of the map is the same, so one query row per (sample, head) is
    attended and its output broadcast over the tokens: [B, H*C, T] (an expanded view)."""
    length = qkv.shape[-1]
    q, k, v = split_qkv(qkv, num_heads, layout)
    mean_q = q.mean(dim=2, keepdim=True)  # [B, H, 1, C]
    row = merge_heads(F.scaled_dot_product_attention(mean_q, k, v))  # [B, H*C, 1]
    return row.expand(-1, -1, length)


class SDPAAttention(nn.Module):
    """``QKVAttention(Legacy)`` through ``scaled_dot_product_attention``; same input and output.

    The exact op scales q and k by ``C**-0.25`` each; SDPA's default scale ``C**-0.5`` is the
    same product. Output: [B, H*C, T] with channel ``h*C + c``, as the exact op.
    """

    def __init__(self, n_heads, layout="legacy"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.n_heads = n_heads
        self.layout = layout

    def forward(self, qkv):
        q, k, v = split_qkv(qkv, self.n_heads, self.layout)
        return merge_heads(F.scaled_dot_product_attention(q, k, v))

    def extra_repr(self):
        return f"n_heads={self.n_heads}, layout={self.layout}"


def op_layout(op):
    """"legacy" / "new" for any attention op of an AttentionBlock."""
    if isinstance(op, SDPAAttention):
        return op.layout
    if isinstance(op, QKVAttention):
        return "new"
    if isinstance(op, QKVAttentionLegacy):
        return "legacy"
    raise TypeError(f"unknown attention op {type(op).__name__}")


def use_sdpa_attention(model):
    """Swap every AttentionBlock's ``.attention`` op for :class:`SDPAAttention`, in place.

    The ops hold no parameters or buffers, so the state_dict is unchanged. Hooks on the old ops
    are not carried over: attach SAG probes after the swap. Returns the number of ops swapped.
    """
    swapped = 0
    for block in model.modules():
        if isinstance(block, AttentionBlock) and not isinstance(block.attention, SDPAAttention):
            old = block.attention
            if old._forward_hooks or old._forward_pre_hooks:
                raise RuntimeError("an attention op carries hooks (a SAG probe?): swap before probing")
            block.attention = SDPAAttention(old.n_heads, op_layout(old))
            swapped += 1
    return swapped


def use_exact_attention(model):
    """Undo :func:`use_sdpa_attention` (back to the einsum ops of ``unet.py``)."""
    for block in model.modules():
        if isinstance(block, AttentionBlock) and isinstance(block.attention, SDPAAttention):
            op = block.attention
            block.attention = (QKVAttention if op.layout == "new" else QKVAttentionLegacy)(op.n_heads)


def attention_colsum_chunked(qkv, num_heads, layout="legacy", max_elements=1 << 24):
    """Same result as ``sag.attention_colsum`` (within ~1e-6 in fp32), in O(B*H*chunk*T) memory.

    Softmax over keys of ``q·k / sqrt(C)`` in float32, summed over query chunks of at most
    ``max_elements / (B*H*T)`` rows, then averaged over heads: [B, T], mean over keys 1.
    """
    q, k, _ = split_qkv(qkv.float(), num_heads, layout)  # [B, H, T, C]
    bs, heads, length, ch = q.shape
    scale = 1 / math.sqrt(math.sqrt(ch))
    q = (q * scale).reshape(bs * heads, length, ch)
    kt = (k * scale).reshape(bs * heads, length, ch).transpose(1, 2)  # [BH, C, T]
    rows = max(1, min(length, max_elements // max(1, bs * heads * length)))
    total = None
    for start in range(0, length, rows):
        logits = th.bmm(q[:, start:start + rows], kt)  # [BH, rows, T]
        part = th.softmax(logits, dim=-1).sum(dim=1)
        total = part if total is None else total + part
    return total.reshape(bs, heads, length).mean(dim=1)
