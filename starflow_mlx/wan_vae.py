"""The Wan2.2 video VAE (the ``Wan2.2_VAE.pth`` of Wan2.2-TI2V-5B) used by STARFlow-V, in MLX.

``WanVAE`` is a ``codec.LatentCodec``: ``to_flow_latent`` / ``from_flow_latent`` / ``decode_stream`` map STARFlow's
channels-first pixels (``(B, T, 3, H, W)`` videos or ``(B, 3, H, W)`` images in [-1, 1]) to the flow latent
``(B, T', z_dim, H/16, W/16)`` (``(B, z_dim, H/16, W/16)`` for images) and back. Pass ``channels_last=True`` to use
MLX's native ``(B, T, H, W, C)`` / ``(B, H, W, C)`` instead and skip the transposes. Internally everything runs
channels-last.

Time is causal: ``T = 1 + 4k`` frames map to ``1 + k`` latent frames. The encoder runs on frame 0 alone and then on
groups of 4 frames; the decoder runs one latent frame at a time (the first yields 1 frame, later ones 4). Every
causal convolution keeps the last two frames of its input between chunks (``_TimeCache``), which makes chunked
processing exactly equal to processing the whole clip, and bounds memory by the chunk.

Flow latent (STARFlow's wrapper around Wan): ``z = (mu - mean) * (1/std) + exp(0.5·clip(logvar))·ε`` per channel,
then latent frames ``>= 1`` are multiplied by ``temporal_scale`` (0.6) for videos; decoding undoes both (dividing
by ``1/std``, as the reference code does). Images (4-D input) go through the same network as a 1-frame clip, with
no temporal scale. ``encode`` gives Wan's own posterior ``(mu, logvar)``, before that normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import mlx.core as mx
import mlx.nn as nn

from .codec import (
    LOGVAR_MAX, LOGVAR_MIN, CausalFrames, LatentFrameStream, check_layout, sample_gaussian,
)
from .tiling import blend_tiles, default_overlap, tile_windows
from .config import Config, bounded
from .weights import KeyMap, compute_dtype, load_model

CACHE_T = 2  # frames of earlier input each causal conv keeps between chunks

# Per-channel latent statistics of Wan2.2_VAE (not stored in the checkpoint; constants of misc/wan_vae2.py).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]


# Upper bounds: about 10x Wan2.2's VAE (widths 160 / 256 x up to 4, 48 latent channels, 704,688,668 weights).
MAX_WAN_WIDTH = 4096
MAX_WAN_PARAMETERS = 7_000_000_000


@dataclass
class WanVAEConfig(Config):
    """Architecture of the Wan2.2 VAE and STARFlow's latent normalisation; the defaults are Wan2.2's."""

    model_type: ClassVar[str] = "wan-vae"
    max_parameters: ClassVar[int] = MAX_WAN_PARAMETERS

    base_dim: int = bounded(160, min=1, max=MAX_WAN_WIDTH)
    decoder_base_dim: int = bounded(256, min=1, max=MAX_WAN_WIDTH)
    z_dim: int = bounded(48, min=1, max=1024)
    dim_mult: list[int] = bounded(default_factory=lambda: [1, 2, 4, 4], min=1, max=64, length=(1, 8))
    num_res_blocks: int = bounded(2, min=1, max=32)
    temporal_downsample: list[bool] = bounded(default_factory=lambda: [False, True, True], length=(0, 7))
    patch_size: int = bounded(2, min=1, max=16)
    image_channels: int = bounded(3, min=1, max=64)
    latents_mean: list[float] = bounded(default_factory=lambda: list(WAN22_LATENTS_MEAN), min=-1000, max=1000)
    # the flow latent is (mu - mean) / std: a std of 0 would divide by zero
    latents_std: list[float] = bounded(default_factory=lambda: list(WAN22_LATENTS_STD), above=0, max=1000)
    temporal_scale: float = bounded(0.6, above=0, max=10)

    def validate(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries; dim_mult {list(self.dim_mult)} "
                f"needs {len(self.dim_mult) - 1} (one per downsampling stage)"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, expected z_dim = {self.z_dim}")

    def parameter_count(self) -> int:
        """Weights of ``WanVAE(self)``, module by module as ``Encoder`` / ``Decoder`` build them."""
        conv3 = lambda i, o, taps=27: taps * i * o + o  # noqa: E731
        linear = lambda i, o: i * o + o  # noqa: E731
        resnet = lambda i, o: i + conv3(i, o) + o + conv3(o, o) + (linear(i, o) if i != o else 0)  # noqa: E731
        mid = lambda d: 2 * resnet(d, d) + d + linear(d, 3 * d) + linear(d, d)  # noqa: E731
        n, blocks, pixels = len(self.dim_mult), self.num_res_blocks, self.image_channels * self.patch_size**2

        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        total = conv3(pixels, dims[0]) + mid(dims[-1]) + dims[-1] + conv3(dims[-1], 2 * self.z_dim)
        for i, d in enumerate(dims[1:]):
            total += resnet(dims[i], d) + (blocks - 1) * resnet(d, d)
            if i < n - 1:  # Downsample: a 3x3 conv, and a (3, 1, 1) time conv where the stage halves time
                total += conv3(d, d, 9) + conv3(d, d, 3) * self.temporal_downsample[i]

        dims = [self.decoder_base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        total += conv3(self.z_dim, dims[0]) + mid(dims[0]) + dims[-1] + conv3(dims[-1], pixels)
        for i, d in enumerate(dims[1:]):
            total += resnet(dims[i], d) + blocks * resnet(d, d)
            if i < n - 1:  # Upsample: a 3x3 conv, and a (3, 1, 1) time conv to twice the channels
                total += conv3(d, d, 9) + conv3(d, 2 * d, 3) * self.temporal_downsample[::-1][i]

        return total + linear(2 * self.z_dim, 2 * self.z_dim) + linear(self.z_dim, self.z_dim)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

# ----------------------------------------------------------------------------------------------------------------
# Per-call causal state
# ----------------------------------------------------------------------------------------------------------------

_REPLICATE = "first-chunk"  # marks an upsample3d slot that has seen only the first chunk (Wan's "Rep")


class _TimeCache:
    """Earlier frames kept by every causal site, in call order; one instance per encode / decode stream tile."""

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def rewind(self):
        self.index = 0

    def get(self):
        if self.index == len(self.slots):
            self.slots.append(None)
        return self.slots[self.index]

    def put(self, value):
        self.slots[self.index] = value
        self.index += 1

    def arrays(self) -> list[mx.array]:
        return [s for s in self.slots if isinstance(s, mx.array)]


def _keep_last(x: mx.array, old) -> mx.array:
    """The two frames a causal conv keeps: the last two of its input, or the previous chunk's last + this one."""
    new = _own(x[:, -CACHE_T:])
    if new.shape[1] < CACHE_T and isinstance(old, mx.array):
        new = mx.concatenate([old[:, -1:], new], axis=1)
    return new


def _own(x: mx.array) -> mx.array:
    # A slice shares its source's buffer; a copy lets the chunk's activations be freed while the cache lives on.
    return mx.contiguous(x)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d padded ``2·p_t`` frames in front and none behind (``p`` symmetric in H and W)."""

    def __init__(self, in_dim: int, out_dim: int, kernel=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)):
        super().__init__(in_dim, out_dim, tuple(kernel), stride=tuple(stride), padding=0)
        self.front, self.ph, self.pw = 2 * padding[0], padding[1], padding[2]

    def __call__(self, x: mx.array, history: Optional[mx.array] = None) -> mx.array:
        """``history``: the previous chunk's last input frames, prepended in place of (part of) the front pad."""
        front = self.front
        if history is not None and front > 0:
            x = mx.concatenate([history.astype(x.dtype), x], axis=1)
            front -= history.shape[1]
        if front or self.ph or self.pw:
            x = mx.pad(x, [(0, 0), (front, 0), (self.ph, self.ph), (self.pw, self.pw), (0, 0)])
        return super().__call__(x)

    def cached(self, x: mx.array, cache: _TimeCache) -> mx.array:
        old = cache.get()
        cache.put(_keep_last(x, old))
        return self(x, old)


class RMSNorm(nn.Module):
    """Wan's ``RMS_norm``: ``x / max(||x||_2, 1e-12) · sqrt(C) · γ`` over channels (an L2 normalise, no eps-add)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.scale = math.sqrt(dim)

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        norm = mx.sqrt(mx.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / mx.maximum(norm, 1e-12)
        return (y * (self.scale * self.weight.astype(mx.float32))).astype(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim)
        # A 1x1x1 conv is a per-position Linear in channels-last layout.
        self.shortcut = nn.Linear(in_dim, out_dim) if in_dim != out_dim else None

    def __call__(self, x: mx.array, cache: _TimeCache) -> mx.array:
        h = self.shortcut(x) if self.shortcut is not None else x
        x = self.conv1.cached(nn.silu(self.norm1(x)), cache)
        x = self.conv2.cached(nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (q, k, v = consecutive C-channel groups)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, H, W, C = x.shape
        h = self.norm(x).reshape(B * T, 1, H * W, C)
        q, k, v = mx.split(self.to_qkv(h), 3, axis=-1)
        h = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))
        return x + self.proj(h).reshape(B, T, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attention = AttentionBlock(dim)

    def __call__(self, x: mx.array, cache: _TimeCache) -> mx.array:
        x = self.resnets[0](x, cache)
        x = self.attention(x)
        return self.resnets[1](x, cache)


def _per_frame(fn, x: mx.array) -> mx.array:
    B, T = x.shape[:2]
    y = fn(x.reshape(B * T, *x.shape[2:]))
    return y.reshape(B, T, *y.shape[1:])


class Downsample(nn.Module):
    """Per-frame 3x3 stride-2 conv after a (right 1, bottom 1) zero pad; optionally a stride-2 causal time conv."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=0)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0)) if temporal else None

    def __call__(self, x: mx.array, cache: _TimeCache) -> mx.array:
        x = _per_frame(lambda f: self.conv(mx.pad(f, [(0, 0), (0, 1), (0, 1), (0, 0)])), x)
        if self.time_conv is None:
            return x
        old = cache.get()
        cache.put(_own(x[:, -1:]))
        if old is None:  # the first chunk (a single frame) passes through without temporal downsampling
            return x
        return self.time_conv(mx.concatenate([old[:, -1:].astype(x.dtype), x], axis=1))


class Upsample(nn.Module):
    """Optionally a causal time conv C -> 2C whose halves become frames 2i and 2i+1; then nearest x2 + 3x3 conv."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def __call__(self, x: mx.array, cache: _TimeCache) -> mx.array:
        if self.time_conv is not None:
            old = cache.get()
            if old is None:  # first chunk: no temporal upsampling (the DupUp3D shortcut drops its extra frame too)
                cache.put(_REPLICATE)
            else:
                new = _own(x[:, -CACHE_T:])
                if new.shape[1] < CACHE_T:
                    prev = old[:, -1:] if isinstance(old, mx.array) else mx.zeros_like(new)
                    new = mx.concatenate([prev, new], axis=1)
                # The second chunk is zero-padded (no history), later ones use the kept frames.
                y = self.time_conv(x, old if isinstance(old, mx.array) else None)
                cache.put(new)
                B, T, H, W, C2 = y.shape
                C = C2 // 2
                x = y.reshape(B, T, H, W, 2, C).transpose(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, H, W, C)
        B, T, H, W, C = x.shape
        up = mx.broadcast_to(x[:, :, :, None, :, None, :], (B, T, H, 2, W, 2, C)).reshape(B * T, 2 * H, 2 * W, C)
        y = self.conv(up)
        return y.reshape(B, T, *y.shape[1:])


def avg_down_3d(x: mx.array, out_dim: int, factor_t: int, factor_s: int) -> mx.array:
    """Parameter-free shortcut: fold (t, h, w) offsets into channels (c slowest) and average groups to out_dim."""
    B, T, H, W, C = x.shape
    pad_t = (-T) % factor_t
    if pad_t:
        x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        T += pad_t
    t, h, w = T // factor_t, H // factor_s, W // factor_s
    x = x.reshape(B, t, factor_t, h, factor_s, w, factor_s, C)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, t, h, w, out_dim, -1)
    return mx.mean(x, axis=-1)


def dup_up_3d(x: mx.array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> mx.array:
    """Inverse fold of ``avg_down_3d``: repeat channels, unfold into (t, h, w) offsets; the first chunk keeps 1 frame."""
    B, T, H, W, C = x.shape
    repeats = out_dim * factor_t * factor_s * factor_s // C
    x = mx.repeat(x, repeats, axis=-1).reshape(B, T, H, W, out_dim, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, T * factor_t, H * factor_s, W * factor_s, out_dim)
    if first_chunk:
        x = x[:, factor_t - 1 :]
    return x


class DownBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        self.resample = Downsample(out_dim, temporal) if spatial else None
        self.out_dim = out_dim
        self.factor_t, self.factor_s = (2 if temporal else 1), (2 if spatial else 1)

    def __call__(self, x: mx.array, cache: _TimeCache) -> mx.array:
        shortcut = avg_down_3d(x, self.out_dim, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.resample is not None:
            x = self.resample(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        self.resample = Upsample(out_dim, temporal) if spatial else None
        self.out_dim, self.spatial = out_dim, spatial
        self.factor_t = 2 if temporal else 1

    def __call__(self, x: mx.array, cache: _TimeCache, first_chunk: bool) -> mx.array:
        h = x
        for resnet in self.resnets:
            h = resnet(h, cache)
        if self.resample is None:
            return h
        h = self.resample(h, cache)
        return h + dup_up_3d(x, self.out_dim, self.factor_t, 2, first_chunk)


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.image_channels * cfg.patch_size**2, dims[0])
        self.down_blocks = [
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks,
                      temporal=i < n - 1 and cfg.temporal_downsample[i], spatial=i < n - 1)
            for i in range(n)
        ]
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim)

    def __call__(self, x: mx.array, cache: _TimeCache) -> mx.array:
        x = self.conv_in.cached(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out.cached(nn.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        n = len(mult)
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = [
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks,
                    temporal=i < n - 1 and temporal_up[i], spatial=i < n - 1)
            for i in range(n)
        ]
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.image_channels * cfg.patch_size**2)

    def __call__(self, x: mx.array, cache: _TimeCache, first_chunk: bool) -> mx.array:
        x = self.conv_in.cached(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, first_chunk)
        return self.conv_out.cached(nn.silu(self.norm_out(x)), cache)


def patchify(x: mx.array, p: int) -> mx.array:
    """(B, T, H·p, W·p, C) -> (B, T, H, W, C·p·p), channel order (c, column offset, row offset) as in Wan."""
    if p == 1:
        return x
    B, T, H, W, C = x.shape
    x = x.reshape(B, T, H // p, p, W // p, p, C).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(B, T, H // p, W // p, C * p * p)


def unpatchify(x: mx.array, p: int) -> mx.array:
    if p == 1:
        return x
    B, T, H, W, Cp = x.shape
    C = Cp // (p * p)
    x = x.reshape(B, T, H, W, C, p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(B, T, H * p, W * p, C)


def _layout(channels_last: bool) -> str:
    return "(B, T, H, W, C) or (B, H, W, C)" if channels_last else "(B, T, C, H, W) or (B, C, H, W)"


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class WanVAE(CausalFrames, nn.Module):
    """The Wan2.2 VAE as a ``codec.LatentCodec`` (see the module docstring); ``encode`` is the lower-level posterior."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Linear(2 * config.z_dim, 2 * config.z_dim)
        self.post_quant_conv = nn.Linear(config.z_dim, config.z_dim)
        self.decoder = Decoder(config)
        # Underscored: kept out of parameters() (they are constants, not checkpoint tensors).
        self._mean = mx.array(config.latents_mean, dtype=mx.float32)
        self._inv_std = 1.0 / mx.array(config.latents_std, dtype=mx.float32)

    # -- the LatentCodec contract ---------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    def to_flow_latent(
        self, pixels: mx.array, *, noise: Optional[mx.array] = None, key: Optional[mx.array] = None,
        channels_last: bool = False,
    ) -> mx.array:
        """STARFlow's latent ``ts ⊙ ((mu - mean)/std + exp(0.5·clip(logvar, -30, 20))·ε)``, float32.

        ``noise`` is ε, shaped like the latent in the same layout (zeros: the posterior mean); otherwise ε ~ N(0, 1)
        from ``key``. ``ts`` scales latent frames >= 1 of a video (5-D pixels) by ``temporal_scale``.
        """
        return sample_gaussian(*self.flow_posterior(pixels, channels_last=channels_last), noise, key)

    def flow_posterior(self, pixels: mx.array, *, channels_last: bool = False) -> tuple[mx.array, mx.array]:
        """The distribution ``to_flow_latent`` samples: its mean ``ts ⊙ (mu - mean)/std`` and its standard deviation
        ``ts ⊙ exp(0.5·clip(logvar, -30, 20))``, float32, in the pixels' layout (one encoder pass for both).

        The posterior's std is not divided by the latent std, as in the official ``encode``: a quirk that matters
        only for a VAE whose posterior is wide (Wan2.2's is narrow)."""
        mu, logvar, is_video = self._moments(pixels, channels_last)
        mean = self._from_clip((mu - self._mean) * self._inv_std, is_video, channels_last)
        std = mx.exp(0.5 * self._from_clip(logvar, is_video, channels_last))
        s = self.config.temporal_scale
        if is_video and s != 1 and mean.shape[1] > 1:
            scale = mx.concatenate([mx.ones((1,)), mx.full((mean.shape[1] - 1,), s)])
            scale = scale.reshape((1, -1) + (1,) * (mean.ndim - 2))
            mean, std = mean * scale, std * scale
        return mean, std

    def from_flow_latent(
        self, latent: mx.array, *, tile_size: Optional[int] = None, tile_overlap: Optional[int] = None,
        channels_last: bool = False,
    ) -> mx.array:
        """The whole clip (5-D latent) or image (4-D) as float32 pixels in the latent's layout, not clamped.

        The concatenation of ``decode_stream`` pushes, one latent frame at a time. ``tile_size`` (in latent pixels)
        decodes spatial tiles overlapping by ``tile_overlap`` latent pixels, blended linearly (an approximation:
        tiles do not see each other's neighbourhood).
        """
        z, is_video = self._to_clip(latent, channels_last, "latent")
        self._check_z_dim(z, latent, channels_last)  # here, so the error names the caller's shape and layout
        stream = self.decode_stream(tile_size=tile_size, tile_overlap=tile_overlap, channels_last=True)
        x = mx.concatenate([stream.push(z[:, i]) for i in range(z.shape[1])], axis=1)
        return self._from_clip(x, is_video, channels_last)

    def decode_stream(
        self, *, tile_size: Optional[int] = None, tile_overlap: Optional[int] = None, channels_last: bool = False,
    ) -> "WanDecodeStream":
        return WanDecodeStream(self, tile_size, tile_overlap, channels_last)

    # -- lower level ----------------------------------------------------------------------------------------------

    def encode(self, pixels: mx.array, *, channels_last: bool = False) -> tuple[mx.array, mx.array]:
        """Wan's posterior ``(mu, logvar)``, float32, before STARFlow's normalisation (the flow sees
        ``to_flow_latent``), in the pixels' layout; logvar clamped to [-30, 20] as diffusers does."""
        mu, logvar, is_video = self._moments(pixels, channels_last)
        return self._from_clip(mu, is_video, channels_last), self._from_clip(logvar, is_video, channels_last)

    # -- helpers ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _to_clip(x: mx.array, channels_last: bool, what: str) -> tuple[mx.array, bool]:
        """Any accepted input -> (B, T, H, W, C) and whether it was a video."""
        check_layout(what, x, channels_last, _layout(channels_last))
        if x.ndim == 5:
            return (x if channels_last else x.transpose(0, 1, 3, 4, 2)), True
        return (x if channels_last else x.transpose(0, 2, 3, 1))[:, None], False

    @staticmethod
    def _from_clip(x: mx.array, video: bool, channels_last: bool) -> mx.array:
        if not video:
            x = x[:, 0]
            return x if channels_last else x.transpose(0, 3, 1, 2)
        return x if channels_last else x.transpose(0, 1, 4, 2, 3)

    def _check_z_dim(self, z: mx.array, latent: mx.array, channels_last: bool) -> None:
        if z.shape[-1] != self.config.z_dim:
            raise ValueError(f"latent has {z.shape[-1]} channels, expected z_dim = {self.config.z_dim} "
                             f"(shape {list(latent.shape)}, read as {_layout(channels_last)})")

    def _moments(self, pixels: mx.array, channels_last: bool) -> tuple[mx.array, mx.array, bool]:
        """Wan's (mu, clamped logvar), float32 (B, T', h, w, z_dim), and whether the pixels were a video."""
        x, is_video = self._to_clip(pixels, channels_last, "pixels")
        cfg = self.config
        B, T, H, W, C = x.shape
        if C != cfg.image_channels:
            raise ValueError(f"expected {cfg.image_channels} colour channels, got shape {list(pixels.shape)} "
                             f"(read as {_layout(channels_last)})")
        f = cfg.spatial_factor
        if H % f or W % f:
            raise ValueError(f"height and width must be multiples of {f}, got {H}x{W}")
        step = cfg.temporal_factor
        if (T - 1) % step:
            raise ValueError(f"a clip needs 1 + {step}·k frames (1, {1 + step}, {1 + 2 * step}, ...), got {T}")
        x = patchify(x.astype(compute_dtype(self)), cfg.patch_size)
        cache, outs = _TimeCache(), []
        for start, stop in [(0, 1)] + [(s, s + step) for s in range(1, T, step)]:
            cache.rewind()
            out = self.encoder(x[:, start:stop], cache)
            mx.eval(out, cache.arrays())
            outs.append(out)
        h = self.quant_conv(mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0])
        mu, logvar = mx.split(h.astype(mx.float32), 2, axis=-1)
        return mu, mx.clip(logvar, LOGVAR_MIN, LOGVAR_MAX), is_video


class WanDecodeStream(LatentFrameStream):
    """The Wan VAE's ``codec.DecodeStream``: one ``_TimeCache`` per spatial tile, carried from push to push.

    The first pushed latent frame decodes to 1 frame, each later one to ``temporal_factor`` (4); latent frames
    after the first are divided by the temporal scale, all are un-normalised (``z / (1/std) + mean``) in float32.
    """

    def __init__(self, vae: WanVAE, tile_size: Optional[int], tile_overlap: Optional[int], channels_last: bool):
        super().__init__(channels_last, tile_size, tile_overlap)
        self.vae = vae
        self.dtype = compute_dtype(vae)
        self._tiles: list = []  # ((y0, x0, h, w), _TimeCache) per spatial tile

    def _decode(self, latent_frame: mx.array) -> mx.array:
        vae, cfg = self.vae, self.vae.config
        z = latent_frame if self.channels_last else latent_frame.transpose(0, 2, 3, 1)
        vae._check_z_dim(z, latent_frame, self.channels_last)
        _, h, w, _ = z.shape
        if not self.pushed:
            windows = [(0, 0, h, w)] if self.tile_size is None else tile_windows(
                h, w, self.tile_size, default_overlap(self.tile_size, self.tile_overlap))
            self._tiles = [(window, _TimeCache()) for window in windows]
        z = z.astype(mx.float32)[:, None]
        if self.pushed:
            z = z / cfg.temporal_scale
        z = z / vae._inv_std + vae._mean  # division by the reciprocal, as in the reference
        f = cfg.spatial_factor
        pieces = []
        for (y0, x0, th, tw), cache in self._tiles:
            cache.rewind()
            zi = vae.post_quant_conv(z[:, :, y0 : y0 + th, x0 : x0 + tw].astype(self.dtype))
            out = unpatchify(vae.decoder(zi, cache, first_chunk=not self.pushed), cfg.patch_size)
            mx.eval(out, cache.arrays())
            pieces.append((y0 * f, x0 * f, out))
        out = blend_tiles(pieces, h * f, w * f).astype(mx.float32)
        return out if self.channels_last else out.transpose(0, 1, 4, 2, 3)


def load_wan_vae(folder: str | Path, dtype: Optional[mx.Dtype] = None) -> WanVAE:
    """A converted folder (``starflow-mlx convert wan-vae``) as a ready model; ``dtype`` casts the weights."""
    return load_model(folder, WanVAEConfig, WanVAE, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint names: ours <-> diffusers ``AutoencoderKLWan`` <-> the original ``Wan2.2_VAE.pth`` (convert wan-vae)
# ----------------------------------------------------------------------------------------------------------------


# diffusers names -> ours: RMS-norm gammas are our norms' weights, and the resamplers and the mid attention sit
# one level higher in ours.
DIFFUSERS_NAMES = KeyMap(
    [
        ("{pre}.{norm}.gamma", "{pre}.{norm}.weight"),
        ("{pre}.conv_shortcut.{rest}", "{pre}.shortcut.{rest}"),
        ("{side}.mid_block.attentions.0.{rest}", "{side}.mid_block.attention.{rest}"),
        ("encoder.down_blocks.{i}.downsampler.resample.1.{rest}", "encoder.down_blocks.{i}.resample.conv.{rest}"),
        ("encoder.down_blocks.{i}.downsampler.time_conv.{rest}", "encoder.down_blocks.{i}.resample.time_conv.{rest}"),
        ("decoder.up_blocks.{i}.upsampler.resample.1.{rest}", "decoder.up_blocks.{i}.resample.conv.{rest}"),
        ("decoder.up_blocks.{i}.upsampler.time_conv.{rest}", "decoder.up_blocks.{i}.resample.time_conv.{rest}"),
    ],
    fields={"norm": "norm|norm1|norm2|norm_out", "side": "encoder|decoder"},
)


def original_names(num_res_blocks: int = 2) -> KeyMap:
    """Original Wan checkpoint names -> diffusers names (``.then(DIFFUSERS_NAMES)`` goes on to ours).

    The original blocks are Sequentials: a down block holds its ``num_res_blocks`` residual blocks and then its
    resampler, an up block ``num_res_blocks + 1`` and then its resampler; the middle is (resnet, attention, resnet).
    """
    n = num_res_blocks
    return KeyMap(
        [
            ("conv1.{rest}", "quant_conv.{rest}"),
            ("conv2.{rest}", "post_quant_conv.{rest}"),
            ("{side}.conv1.{rest}", "{side}.conv_in.{rest}"),
            ("{side}.head.0.{rest}", "{side}.norm_out.{rest}"),
            ("{side}.head.2.{rest}", "{side}.conv_out.{rest}"),
            ("{side}.middle.0.{rest}", "{side}.mid_block.resnets.0.{rest}"),
            ("{side}.middle.1.{rest}", "{side}.mid_block.attentions.0.{rest}"),
            ("{side}.middle.2.{rest}", "{side}.mid_block.resnets.1.{rest}"),
            ("encoder.downsamples.{i}.downsamples.{down}.{rest}", "encoder.down_blocks.{i}.resnets.{down}.{rest}"),
            (f"encoder.downsamples.{{i}}.downsamples.{n}.{{rest}}", "encoder.down_blocks.{i}.downsampler.{rest}"),
            ("decoder.upsamples.{i}.upsamples.{up}.{rest}", "decoder.up_blocks.{i}.resnets.{up}.{rest}"),
            (f"decoder.upsamples.{{i}}.upsamples.{n + 1}.{{rest}}", "decoder.up_blocks.{i}.upsampler.{rest}"),
            ("{resnet}.residual.0.{rest}", "{resnet}.norm1.{rest}"),
            ("{resnet}.residual.2.{rest}", "{resnet}.conv1.{rest}"),
            ("{resnet}.residual.3.{rest}", "{resnet}.norm2.{rest}"),
            ("{resnet}.residual.6.{rest}", "{resnet}.conv2.{rest}"),
            ("{resnet}.shortcut.{rest}", "{resnet}.conv_shortcut.{rest}"),
        ],
        fields={
            "side": "encoder|decoder",
            "down": "|".join(map(str, range(n))),
            "up": "|".join(map(str, range(n + 1))),
            "resnet": r".+\.resnets\.\d+",
        },
    )
