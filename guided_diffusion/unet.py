"""The ADM UNet, its super-resolution variant and the noisy-classifier encoder.

Parameter names, order and shapes are exactly those of OpenAI's released checkpoints, so
``load_state_dict(torch.load(path), strict=True)`` works for every published model. Every
``forward`` returns a tensor; SAG captures attention from outside with a forward hook on an
attention block's ``.attention`` op (see ``sag.py``), and PAG / SEG swap that op only for their
perturbed pass (see ``pag.py``).
"""

import math
from abc import abstractmethod

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to ``x`` given the timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that hands the embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two axes for 3-D), optionally followed by a conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided conv or by average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (BigGAN-style up/down optional).

    With ``use_scale_shift_norm`` the embedding gives a scale and shift applied after the
    second normalisation (AdaGN); otherwise it is added to the hidden state.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention over a qkv tensor laid out per head as ``[q_h | k_h | v_h]``."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        q, k, v = qkv_heads(qkv, self.n_heads, new_order=False)
        return attend(q, k, v).reshape(qkv.shape[0], -1, qkv.shape[-1])


class QKVAttention(nn.Module):
    """Multi-head attention over a qkv tensor laid out as ``[Q_all | K_all | V_all]``."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        q, k, v = qkv_heads(qkv, self.n_heads, new_order=True)
        return attend(q, k, v).reshape(qkv.shape[0], -1, qkv.shape[-1])


def qkv_heads(qkv, n_heads, new_order):
    """Split a [B, 3*H*C, T] qkv tensor into q, k, v of shape [B*H, C, T].

    Legacy order: head h owns rows ``[3Ch, 3C(h+1))`` = its q | k | v; new order: rows
    ``[0, HC)`` are every head's q (head-major), then all k, then all v.
    """
    bs, width, length = qkv.shape
    assert width % (3 * n_heads) == 0
    ch = width // (3 * n_heads)
    if new_order:
        return tuple(part.reshape(bs * n_heads, ch, length) for part in qkv.chunk(3, dim=1))
    return qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)


def attend(q, k, v, logit_mask=None):
    """softmax(q^T k / sqrt(C)) applied to v, for [B*heads, C, T] tensors (softmax in fp32).

    q and k are each scaled by ``C**-0.25`` (more stable in fp16). ``logit_mask`` (bool,
    [B*heads, T, T]) sets the chosen logits to -inf before the softmax (PAG's perturbation).
    """
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
    if logit_mask is not None:
        weight = weight.masked_fill(logit_mask, float("-inf"))
    weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
    return th.einsum("bts,bcs->bct", weight, v)


class AttentionBlock(nn.Module):
    """Spatial self-attention: every position attends to every other position.

    ``self.attention`` is the inner op whose input (the qkv tensor) SAG's probe captures.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (
                f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}"
            )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention_op = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_op(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(self.attention(qkv))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token, with positions, attends to all tokens."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.attention(self.qkv_proj(x))
        return self.c_proj(x)[:, :, 0]


class UNetModel(nn.Module):
    """The ADM UNet (Dhariwal & Nichol) with OpenAI's constructor arguments.

    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention is used.
    :param num_heads_upsample: heads of the decoder's attention (-1: same as ``num_heads``).
    :param num_head_channels: if not -1, fixed channels per head instead of a fixed head count.
    :param use_new_attention_order: ``[Q|K|V]`` qkv layout instead of the legacy per-head one.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = _time_embedding(model_channels, time_embed_dim)
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        res_block, attention_block = _block_factories(
            time_embed_dim, dropout, dims, use_checkpoint, use_scale_shift_norm,
            num_head_channels, use_new_attention_order,
        )

        self.input_blocks, input_block_chans, ch, ds = _build_encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
            res_block, lambda c: attention_block(c, num_heads), resblock_updown, conv_resample, dims,
        )
        self.middle_block = _build_middle(ch, res_block, attention_block(ch, num_heads))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [res_block(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True) if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """Cast the torso (input, middle, output blocks) to float16, as OpenAI's ``--use_fp16``."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self):
        """Cast the torso back to float32."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)
        self.dtype = th.float32

    def forward(self, x, timesteps, y=None):
        """Apply the model to a batch ``x`` [N, C, ...] at ``timesteps`` [N] with labels ``y``."""
        assert (y is not None) == (self.num_classes is not None), (
            "must specify y if and only if the model is class-conditional"
        )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(th.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _time_embedding(model_channels, time_embed_dim):
    return nn.Sequential(
        linear(model_channels, time_embed_dim),
        SiLU(),
        linear(time_embed_dim, time_embed_dim),
    )


def _block_factories(time_embed_dim, dropout, dims, use_checkpoint, use_scale_shift_norm,
                     num_head_channels, use_new_attention_order):
    """Constructors ``res_block(ch, out_ch, **kw)`` and ``attention_block(ch, heads)``."""

    def res_block(ch, out_ch, **kw):
        return ResBlock(
            ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw,
        )

    def attention_block(ch, heads):
        return AttentionBlock(
            ch, use_checkpoint=use_checkpoint, num_heads=heads,
            num_head_channels=num_head_channels, use_new_attention_order=use_new_attention_order,
        )

    return res_block, attention_block


def _build_encoder(in_channels, model_channels, channel_mult, num_res_blocks,
                   attention_resolutions, res_block, attention_block, resblock_updown,
                   conv_resample, dims):
    """The downsampling path shared by the UNet and the classifier encoder.

    Returns (input_blocks, the output channels of every block, final channels, final ds).
    """
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attention_block(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(
                res_block(ch, ch, down=True) if resblock_updown
                else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
            ))
            chans.append(ch)
            ds *= 2
    return blocks, chans, ch, ds


def _build_middle(ch, res_block, attention):
    return TimestepEmbedSequential(res_block(ch, ch), attention, res_block(ch, ch))


class SuperResModel(UNetModel):
    """A UNet that also sees a low-resolution image (bilinearly upsampled, concatenated)."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        return super().forward(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(nn.Module):
    """The UNet's encoder half with a pooling head: OpenAI's noisy classifier.

    ``pool``: "adaptive", "attention", "spatial" or "spatial_v2".
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.pool = pool

        time_embed_dim = model_channels * 4
        self.time_embed = _time_embedding(model_channels, time_embed_dim)
        res_block, attention_block = _block_factories(
            time_embed_dim, dropout, dims, use_checkpoint, use_scale_shift_norm,
            num_head_channels, use_new_attention_order,
        )

        self.input_blocks, chans, ch, ds = _build_encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
            res_block, lambda c: attention_block(c, num_heads), resblock_updown, conv_resample, dims,
        )
        self.middle_block = _build_middle(ch, res_block, attention_block(ch, num_heads))
        # Width of the concatenated per-block means used by the "spatial" heads.
        self._feature_size = sum(chans) + ch

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            assert num_head_channels != -1, "attention pooling needs num_head_channels"
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, self.out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                SiLU(),
                nn.Linear(2048, self.out_channels),
            )
        else:
            raise NotImplementedError(f"unexpected {pool} pooling")

    def convert_to_fp16(self):
        """Cast the torso (input and middle blocks) to float16."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self):
        """Cast the torso back to float32."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.dtype = th.float32

    def forward(self, x, timesteps):
        """Logits [N, out_channels] for a batch ``x`` at ``timesteps``."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(th.cat(means, dim=-1))
        return self.out(h.type(x.dtype))
