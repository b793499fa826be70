"""The latent codec: what the flow sees of a VAE. ``WanVAE`` (STARFlow-V) and ``SDVAE`` (STARFlow) both implement it.

The flow never sees a VAE's own posterior: it is trained on, and samples, the *flow latent*, the VAE posterior
sample mapped by the wrapper STARFlow puts around each VAE (spec §7): for the Wan2.2 VAE
``ts ⊙ ((mu - mean) / std + exp(0.5·clip(logvar, -30, 20))·ε)`` with the temporal scale ``ts`` (0.6) on latent
frames >= 1 of a video; for the SD VAE ``(mean + std·ε - shift)·scaling_factor``. A ``LatentCodec`` maps pixels
to flow latents and back, and nothing else has to know which VAE it is.

Words, with one meaning on both VAEs:

- **pixels**: a video ``(B, T, 3, H, W)`` or an image ``(B, 3, H, W)`` in [-1, 1], channels-first
  (``channels_last=True``: ``(B, T, H, W, 3)`` / ``(B, H, W, 3)``).
- **latent**: the flow latent, float32, ``(B, T', C, h, w)`` / ``(B, C, h, w)`` (channels-last likewise), with
  ``C = latent_channels``, ``H = h · spatial_factor`` and ``T = frames_for(T')``.
- **latent frame**: one ``(B, C, h, w)`` time step of a latent; the flow finishes them one after the other.
- **noise**: the ε of the posterior sample, shaped like the latent; zeros give the posterior mean.
- **tile_size** / **tile_overlap**: spatial tiling of the decoder, in latent pixels (see ``tiling``); ``None`` for
  tile_size decodes the whole frame at once, ``None`` for tile_overlap is ``tiling.default_overlap``.

Outputs are float32 whatever the weights' dtype (``weights.compute_dtype``: a codec computes in its weights' dtype
and hands float32 on); the latent normalisation runs in float32.

Lower-level, VAE-specific API (not part of the contract): ``encode(pixels) -> (mean, logvar)``, the VAE's own
posterior in its own latent units (Wan's raw ``mu``, diffusers' unscaled ``latent_dist``), logvar clamped to
[-30, 20] as diffusers does; float32.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import mlx.core as mx

from . import arguments

# diffusers' DiagonalGaussianDistribution and Wan's sample() clamp the posterior log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@runtime_checkable
class DecodeStream(Protocol):
    """A stateful decoder fed one latent frame at a time, in order (from ``LatentCodec.decode_stream``).

    ``push(latent_frame)`` takes one ``(B, C, h, w)`` latent frame (``(B, h, w, C)`` for a channels-last stream)
    and returns the evaluated float32 pixel frames it completes, ``(B, n, 3, H, W)`` (``(B, n, H, W, 3)``): for the
    Wan VAE ``n`` is 1 for the first latent frame and ``temporal_factor`` (4) for each later one, the causal cache
    carried between calls; for the SD VAE ``n`` is 1. Every push must have the first one's shape. The
    concatenation of all pushes equals ``from_flow_latent`` of the whole latent, and memory is bounded by one
    latent frame's decode, so a caller can show or write each frame as soon as the flow has finished its latent.
    """

    def push(self, latent_frame: mx.array) -> mx.array: ...


@runtime_checkable
class LatentCodec(Protocol):
    """Pixels <-> the latent the flow is trained on; see the module docstring for the meaning of every word."""

    @property
    def latent_channels(self) -> int:
        """C of the flow latent (48 Wan, 4 SD)."""
        ...

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (16 Wan, 8 SD)."""
        ...

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4 Wan, 1 SD)."""
        ...

    def frames_for(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latent frames: Wan ``1 + 4(k - 1)``, SD ``k`` (0 for 0)."""
        ...

    def to_flow_latent(
        self, pixels: mx.array, *, noise: Optional[mx.array] = None, key: Optional[mx.array] = None,
        channels_last: bool = False,
    ) -> mx.array:
        """Pixels -> flow latent (float32): the posterior sample with ε = ``noise`` (zeros: the posterior mean),
        else ε ~ N(0, 1) drawn from ``key`` (MLX's global generator when both are None)."""
        ...

    def from_flow_latent(
        self, latent: mx.array, *, tile_size: Optional[int] = None, tile_overlap: Optional[int] = None,
        channels_last: bool = False,
    ) -> mx.array:
        """Flow latent -> pixels of the whole clip or image, float32, not clamped (the saver clamps to [-1, 1])."""
        ...

    def decode_stream(
        self, *, tile_size: Optional[int] = None, tile_overlap: Optional[int] = None, channels_last: bool = False,
    ) -> DecodeStream:
        """A fresh ``DecodeStream`` for one latent video (batch and frame size are fixed by its first push)."""
        ...


class LatentFrameStream:
    """What both VAEs' ``DecodeStream`` share: the one-frame argument check, the fixed frame shape, the count.

    Subclasses implement ``_decode(latent_frame)``: one 4-D latent frame in the stream's layout -> its pixel
    frames, 5-D float32 (``self.pushed`` is the latent frame's index).
    """

    def __init__(self, channels_last: bool, tile_size: Optional[int], tile_overlap: Optional[int]):
        self.channels_last = arguments.flag("channels_last", channels_last)
        self.tile_size, self.tile_overlap = check_tiling(tile_size, tile_overlap)
        self.pushed = 0  # latent frames decoded so far
        self._shape: Optional[tuple] = None  # the first push's shape

    def push(self, latent_frame: mx.array) -> mx.array:
        layout = "(B, h, w, C)" if self.channels_last else "(B, C, h, w)"
        arguments.array("latent_frame", latent_frame, f"one latent frame {layout}", (4,))
        if self._shape is not None and tuple(latent_frame.shape) != self._shape:
            raise ValueError(f"latent frame {self.pushed} has shape {list(latent_frame.shape)}; the first pushed "
                             f"frame had {list(self._shape)} {layout}")
        out = self._decode(latent_frame)
        mx.eval(out)
        self._shape = tuple(latent_frame.shape)
        self.pushed += 1
        return out

    def _decode(self, latent_frame: mx.array) -> mx.array:
        raise NotImplementedError


def check_tiling(tile_size, tile_overlap) -> tuple[Optional[int], Optional[int]]:
    """The decoders' tiling arguments: ``tile_size`` None or an integer >= 1 latent pixels, ``tile_overlap`` None
    or an integer in [0, tile_size)."""
    tile_size = arguments.integer("tile_size", tile_size, minimum=1, optional=True)
    tile_overlap = arguments.integer("tile_overlap", tile_overlap, minimum=0, optional=True)
    if tile_size is not None and tile_overlap is not None and tile_overlap >= tile_size:
        raise ValueError(f"tile_overlap must be smaller than tile_size {tile_size}, got {tile_overlap}")
    return tile_size, tile_overlap


def check_layout(name: str, x, channels_last: bool, layouts: str) -> mx.array:
    """A codec's pixels or latent: a floating mx.array of 4 or 5 dimensions, ``layouts`` naming them."""
    arguments.flag("channels_last", channels_last)
    return arguments.array(name, x, layouts, (4, 5))


class CausalFrames:
    """Mixin of both VAEs: ``frames_for`` from ``temporal_factor`` (the first latent frame gives 1 frame)."""

    temporal_factor: int

    def frames_for(self, latent_frames: int) -> int:
        if latent_frames < 0:
            raise ValueError(f"latent_frames must be >= 0, got {latent_frames}")
        return 0 if latent_frames == 0 else 1 + self.temporal_factor * (latent_frames - 1)


def sample_posterior(
    mean: mx.array, logvar: mx.array, noise: Optional[mx.array], key: Optional[mx.array]
) -> mx.array:
    """``mean + exp(0.5·logvar)·ε`` in float32, ε = ``noise`` (shaped like ``mean``) or N(0, 1) from ``key``.

    ``logvar`` must already be clamped to [LOGVAR_MIN, LOGVAR_MAX].
    """
    return sample_gaussian(mean, mx.exp(0.5 * logvar.astype(mx.float32)), noise, key)


def sample_gaussian(mean: mx.array, std: mx.array, noise: Optional[mx.array], key: Optional[mx.array]) -> mx.array:
    """``mean + std·ε`` in float32, ε = ``noise`` (shaped like ``mean``) or N(0, 1) from ``key``."""
    mean, std = mean.astype(mx.float32), std.astype(mx.float32)
    if key is not None and not isinstance(key, mx.array):
        raise ValueError(f"key must be an mlx random key (mx.random.key(seed)) or None, got {type(key).__name__}")
    if noise is None:
        eps = mx.random.normal(mean.shape, key=key)
    else:
        arguments.array("noise", noise, f"{list(mean.shape)} like the latent", None)
        if tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"noise has shape {list(noise.shape)}, expected {list(mean.shape)} (the latent's)")
        eps = noise.astype(mx.float32)
    return mean + std * eps
