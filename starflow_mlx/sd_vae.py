"""The Stable Diffusion image VAE (diffusers ``AutoencoderKL``, e.g. ``stabilityai/sd-vae-ft-ema``) in MLX.

STARFlow (text-to-image) encodes images into its latent space with this VAE and decodes samples back (spec §7.1).
The modules keep the diffusers parameter names (``encoder.down_blocks.0.resnets.1.conv2.weight`` ...), so the
converter only has to transpose convolution kernels to MLX's ``[out, kH, kW, in]``.

``SDVAE`` is a ``codec.LatentCodec``. Layout: every public method takes and returns STARFlow's channels-first
tensors by default, images ``(B, 3, H, W)`` in [-1, 1] and latents ``(B, 4, H/8, W/8)``; ``(B, T, C, H, W)`` stacks
of frames are folded into the batch, as the official wrapper does for image VAEs. Pass ``channels_last=True`` to use
MLX's native ``(B, H, W, C)`` instead and skip the transposes. Internally everything runs channels-last.

- ``to_flow_latent(x, noise=None, key=None)``: ``(mean + exp(logvar / 2) * eps - shift) * scaling_factor``, the
  latent STARFlow trains on (shift is 0 for SD VAEs).
- ``from_flow_latent(z)``: ``z / scaling_factor + shift`` through the decoder, an image in roughly [-1, 1] (not
  clamped); ``decode_stream()`` does the same one latent frame at a time.
- ``encode(x) -> (mean, logvar)`` (lower level): the diagonal Gaussian posterior, logvar clamped to [-30, 20] as
  diffusers does.

The model computes in its weights' dtype (``weights.compute_dtype``) and returns float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from .codec import (
    LOGVAR_MAX, LOGVAR_MIN, CausalFrames, LatentFrameStream, check_layout, check_tiling, sample_posterior,
)
from .tiling import default_overlap, tiled_apply
from .config import Config, bounded, shown
from .weights import KeyMap, compute_dtype, load_model

# diffusers hard-codes this for AutoencoderKL: every norm uses eps 1e-6 (the logvar clamp is in codec).
NORM_EPS = 1e-6


# Upper bounds: about 10x the SD-family VAEs (widths up to 512, 4 blocks, 4 to 16 latent channels, 83,653,863
# weights for sd-vae-ft-ema).
MAX_SD_WIDTH = 4096
MAX_SD_PARAMETERS = 1_000_000_000


@dataclass
class SDVAEConfig(Config):
    """Architecture of an ``AutoencoderKL`` (diffusers field names); the defaults are ``sd-vae-ft-ema``."""

    model_type: ClassVar[str] = "sd-vae"
    max_parameters: ClassVar[int] = MAX_SD_PARAMETERS

    in_channels: int = bounded(3, min=1, max=64)
    out_channels: int = bounded(3, min=1, max=64)
    latent_channels: int = bounded(4, min=1, max=256)
    block_out_channels: list[int] = bounded(
        default_factory=lambda: [128, 256, 512, 512], min=1, max=MAX_SD_WIDTH, length=(1, 8)
    )
    layers_per_block: int = bounded(2, min=1, max=32)
    norm_num_groups: int = bounded(32, min=1, max=1024)
    scaling_factor: float = bounded(0.18215, above=0, max=100)
    shift_factor: float | None = bounded(None, min=-100, max=100)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def validate(self) -> None:
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels}: every width must be a multiple of "
                    f"norm_num_groups {self.norm_num_groups}"
                )

    def parameter_count(self) -> int:
        """Weights of ``SDVAE(self)``, module by module as ``Encoder`` / ``Decoder`` build them."""
        conv = lambda i, o, taps=9: taps * i * o + o  # noqa: E731
        resnet = lambda i, o: 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)  # noqa: E731
        # the mid block: two resnets and, optionally, a group norm and four 1x1 projections
        mid = lambda d: 2 * resnet(d, d) + (2 * d + 4 * conv(d, d, 1)) * self.mid_block_add_attention  # noqa: E731
        latent, n = self.latent_channels, len(self.block_out_channels)

        def stack(widths: list[int], layers: int) -> int:
            """The resnets and resamplers of the down (or up) blocks."""
            total = 0
            for i, w in enumerate(widths):
                total += resnet(widths[max(i - 1, 0)], w) + (layers - 1) * resnet(w, w)
                total += conv(w, w) if i < n - 1 else 0
            return total

        widths = self.block_out_channels
        encoder = conv(self.in_channels, widths[0]) + stack(widths, self.layers_per_block) + mid(widths[-1])
        encoder += 2 * widths[-1] + conv(widths[-1], 2 * latent)
        widths = widths[::-1]
        decoder = conv(latent, widths[0]) + mid(widths[0]) + stack(widths, self.layers_per_block + 1)
        decoder += 2 * widths[-1] + conv(widths[-1], self.out_channels)
        quant = conv(2 * latent, 2 * latent, 1) * self.use_quant_conv
        post_quant = conv(latent, latent, 1) * self.use_post_quant_conv
        return encoder + decoder + quant + post_quant

    @property
    def downsample(self) -> int:
        """Spatial reduction from image to latent: one stride-2 conv per block except the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def spatial_factor(self) -> int:
        return self.downsample

    @property
    def temporal_factor(self) -> int:
        return 1  # an image VAE: every latent frame is one frame

    @classmethod
    def from_diffusers(cls, d: dict) -> "SDVAEConfig":
        """Read the architecture from a diffusers config.json (its other fields are ignored).

        Block types and the activation are checked rather than stored: this port only implements the
        ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` / SiLU variant that every SD-family VAE uses.
        """
        act = d.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"act_fn {shown(act)} is not supported (only 'silu')")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names})
        n = len(config.block_out_channels)
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if d.get(key) is not None and d[key] != [want] * n:
                raise ValueError(f"{key} {shown(d[key])} is not supported: expected {n} x {want!r}")
        return config


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm semantics (groups are contiguous runs of channels) for channels-last input.

    Written out instead of ``nn.GroupNorm(pytorch_compatible=True)``, which transposes the activations twice around
    ``mx.fast.layer_norm``. Reducing in place and folding the affine into one scale and shift is 1.7-3x faster on
    the CPU at the decoder's 256x256 activations, and more accurate: on a 256-channel 256x256 activation (groups of
    half a million values) the layer_norm route was off by 5e-4 from a float64 reference, this by 3e-5, which took
    the full-size decoder's parity with diffusers from 2e-4 to 2e-5. Statistics are taken in float32 (two-pass
    variance) whatever the activation dtype.
    """

    def __init__(self, num_groups: int, dims: int, eps: float = NORM_EPS):
        super().__init__()
        if dims % num_groups:
            raise ValueError(f"GroupNorm: {dims} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        shape, dtype = x.shape, x.dtype
        g = self.num_groups
        xg = x.reshape(shape[0], -1, g, shape[-1] // g).astype(mx.float32)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = mx.square(xg - mean).mean(axis=(1, 3), keepdims=True)
        scale = mx.rsqrt(var + self.eps) * self.weight.astype(mx.float32).reshape(g, -1)
        shift = self.bias.astype(mx.float32).reshape(g, -1) - mean * scale
        return (xg * scale + shift).astype(dtype).reshape(shape)


def _group_norm(groups: int, channels: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding: norm, SiLU, conv, twice, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual (diffusers ``Attention`` in a VAE)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # One head of width C: the softmax scale is 1/sqrt(C).
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        return x + self.to_out[0](o).reshape(b, h, w, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding of one row at the bottom and one column at the right only.

    diffusers builds it with ``padding=0`` and pads ``(0, 1, 0, 1)`` itself; a symmetric padding of 1 would shift
    the sampling grid by one pixel.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        self.downsamplers = [Downsample(out_channels)] if add_downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        self.upsamplers = [Upsample(out_channels)] if add_upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class MidBlock(nn.Module):
    """resnet, attention, resnet at the bottleneck width."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        self.attentions = [MidAttention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(widths[max(i - 1, 0)], w, cfg.layers_per_block, g, add_downsample=i < len(widths) - 1)
            for i, w in enumerate(widths)
        ]
        self.mid_block = MidBlock(widths[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(g, widths[-1])
        # Mean and logvar side by side.
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        widths, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], g, cfg.mid_block_add_attention)
        # The decoder has one more resnet per block than the encoder (diffusers: layers_per_block + 1).
        self.up_blocks = [
            UpBlock(widths[max(i - 1, 0)], w, cfg.layers_per_block + 1, g, add_upsample=i < len(widths) - 1)
            for i, w in enumerate(widths)
        ]
        self.conv_norm_out = _group_norm(g, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------------


class SDVAE(CausalFrames, nn.Module):
    """diffusers ``AutoencoderKL`` (SD family) as a ``codec.LatentCodec``; see the module docstring."""

    def __init__(self, config: SDVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c, c, 1)

    # -- the LatentCodec contract ---------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    def to_flow_latent(
        self, pixels: mx.array, *, noise: mx.array | None = None, key: mx.array | None = None,
        channels_last: bool = False,
    ) -> mx.array:
        """STARFlow's latent ``(mean + std·ε - shift)·scaling_factor``, float32 (shift is 0 for SD VAEs).

        ``noise`` is ε, shaped like the latent in the same layout (zeros: the scaled posterior mean); otherwise
        ε ~ N(0, 1) from ``key`` (or MLX's global generator).
        """
        mean, logvar = self.encode(pixels, channels_last=channels_last)
        z = sample_posterior(mean, logvar, noise, key)
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def from_flow_latent(
        self, latent: mx.array, *, tile_size: int | None = None, tile_overlap: int | None = None,
        channels_last: bool = False,
    ) -> mx.array:
        """Float32 pixels from flow latents (``z / scaling_factor + shift`` through the decoder), not clamped.

        ``tile_size`` (in latent pixels, e.g. 64) decodes overlapping tiles one at a time to bound memory for large
        images; the seams are blended over ``tile_overlap`` latent pixels. Results then differ slightly from the
        untiled decode (per-tile GroupNorm statistics and attention).
        """
        tile_size, tile_overlap = check_tiling(tile_size, tile_overlap)
        z, frames = self._to_nhwc(latent, self.config.latent_channels, channels_last, "latent")
        z = z.astype(mx.float32) / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        z = z.astype(compute_dtype(self))
        if tile_size is None:
            x = self.decode_nhwc(z)
        else:
            overlap = default_overlap(tile_size, tile_overlap)
            x = tiled_apply(self.decode_nhwc, z, tile_size, overlap, self.config.downsample)
        return self._from_nhwc(x.astype(mx.float32), frames, channels_last)

    def decode_stream(
        self, *, tile_size: int | None = None, tile_overlap: int | None = None, channels_last: bool = False,
    ) -> "SDDecodeStream":
        return SDDecodeStream(self, tile_size, tile_overlap, channels_last)

    # -- lower level ----------------------------------------------------------------------------------------------

    def encode(self, pixels: mx.array, *, channels_last: bool = False) -> tuple[mx.array, mx.array]:
        """The posterior ``(mean, logvar)`` of images in [-1, 1], unscaled (diffusers' ``latent_dist``), float32."""
        x, frames = self._to_nhwc(pixels, self.config.in_channels, channels_last, "pixels")
        mean, logvar = self.encode_nhwc(x.astype(compute_dtype(self)))
        return self._from_nhwc(mean, frames, channels_last), self._from_nhwc(logvar, frames, channels_last)

    def encode_nhwc(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Channels-last core of ``encode``: (B, H, W, 3) in the weights' dtype -> float32 (mean, clamped logvar)."""
        d = self.config.downsample
        if x.shape[1] % d or x.shape[2] % d:
            raise ValueError(f"image height and width must be multiples of {d}, got {x.shape[1]}x{x.shape[2]}")
        h = self.encoder(x)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h.astype(mx.float32), 2, axis=-1)
        return mean, mx.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode_nhwc(self, z: mx.array) -> mx.array:
        """Channels-last core of ``from_flow_latent``: unscaled (B, h, w, C) latents -> images, weights' dtype."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- layout helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def _to_nhwc(x: mx.array, channels: int, channels_last: bool, what: str) -> tuple[mx.array, tuple | None]:
        """Fold (B, T, ...) into the batch and move channels last; return the frame shape to restore."""
        layouts = "(B, T, H, W, C) or (B, H, W, C)" if channels_last else "(B, T, C, H, W) or (B, C, H, W)"
        check_layout(what, x, channels_last, layouts)
        frames = None
        if x.ndim == 5:
            frames = x.shape[:2]
            x = x.reshape(-1, *x.shape[2:])
        c_axis = 3 if channels_last else 1
        if x.shape[c_axis] != channels:
            layout = "(B, H, W, C)" if channels_last else "(B, C, H, W)"
            raise ValueError(f"{what} must have {channels} channels in layout {layout}, got shape {list(x.shape)}")
        if not channels_last:
            x = x.transpose(0, 2, 3, 1)
        return x, frames

    @staticmethod
    def _from_nhwc(x: mx.array, frames: tuple | None, channels_last: bool) -> mx.array:
        if not channels_last:
            x = x.transpose(0, 3, 1, 2)
        if frames is not None:
            x = x.reshape(*frames, *x.shape[1:])
        return x


class SDDecodeStream(LatentFrameStream):
    """The SD VAE's ``codec.DecodeStream``: each latent frame decodes on its own to one image frame."""

    def __init__(self, vae: SDVAE, tile_size: int | None, tile_overlap: int | None, channels_last: bool):
        super().__init__(channels_last, tile_size, tile_overlap)
        self.vae = vae

    def _decode(self, latent_frame: mx.array) -> mx.array:
        x = self.vae.from_flow_latent(latent_frame, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                                      channels_last=self.channels_last)
        return x[:, None]


def load_sd_vae(folder: str | os.PathLike, dtype: mx.Dtype | None = None) -> SDVAE:
    """Load a folder written by ``starflow-mlx convert sd-vae`` (strict: every weight present with its shape).

    ``dtype`` casts the weights (e.g. ``mx.float16``); ``None`` keeps the stored dtype. The SD VAE is normally run
    in float32, as STARFlow does.
    """
    return load_model(folder, SDVAEConfig, SDVAE, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Other spellings of the parameter names (``starflow-mlx convert sd-vae``)
# ----------------------------------------------------------------------------------------------------------------


# Names some checkpoints use -> the diffusers names (ours): the ``encoder.0/encoder.1/decoder.0/decoder.1`` prefixes
# of STARFlow's fine-tuned VAE, an nn.Sequential(encoder, quant_conv) and an nn.Sequential(post_quant_conv, decoder),
# and the attention names of diffusers < 0.14 (which diffusers itself still renames at load time).
ALIASES = KeyMap(
    [
        ("encoder.0.{rest}", "encoder.{rest}"),
        ("encoder.1.{rest}", "quant_conv.{rest}"),
        ("decoder.0.{rest}", "post_quant_conv.{rest}"),
        ("decoder.1.{rest}", "decoder.{rest}"),
        ("{attention}.query.{p}", "{attention}.to_q.{p}"),
        ("{attention}.key.{p}", "{attention}.to_k.{p}"),
        ("{attention}.value.{p}", "{attention}.to_v.{p}"),
        ("{attention}.proj_attn.{p}", "{attention}.to_out.0.{p}"),
    ],
    fields={"attention": r".+\.attentions\.\d+", "p": "weight|bias"},
)
