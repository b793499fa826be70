"""Spatial tiling for the VAE decoders: overlapping windows, decoded one at a time, blended with linear ramps.

Weights are normalised by their sum, so a purely local function gives exactly the untiled result; a VAE (whose
norms and attention see one tile) differs slightly at the seams: the price of memory bounded by the tile.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


# Default overlap of neighbouring tiles, in latent pixels, the same for both VAE decoders. At latent resolution the
# two decoders are built alike (conv_in, a mid block of two resnets around a global attention, an up block of three
# resnets: eleven 3x3 convs before the first upsampling), so a tile's missing neighbourhood reaches equally far into
# it, counted in latent pixels, on both: one number fits both. With 8 (64 image pixels on SD, 128 on Wan) the linear
# blend ramp spans most of that 11-pixel receptive radius, so a tile has little weight where its missing
# neighbourhood matters most; 8 was already the SD default, while Wan's former 4 covered barely a third of it. The
# price is decoding the overlaps twice: (t / (t - 8))^2, 1.3x for SD's usual 64-latent-pixel tiles, 1.8x for Wan's
# 32. ``default_overlap`` caps it at half a tile.
TILE_OVERLAP = 8


def default_overlap(tile_size: int, tile_overlap: int | None) -> int:
    """``tile_overlap`` if given, else ``TILE_OVERLAP`` capped at half the tile."""
    return min(TILE_OVERLAP, tile_size // 2) if tile_overlap is None else tile_overlap


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, x0, h, w) windows of at most ``tile`` pixels overlapping by at least ``overlap``."""
    if tile >= 1 and height <= tile and width <= tile:
        return [(0, 0, height, width)]
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiling needs tile_size >= 1 and 0 <= tile_overlap < tile_size, got {tile} and {overlap}")
    stride = tile - overlap
    return [
        (y0, x0, min(tile, height - y0), min(tile, width - x0))
        for y0 in _starts(height, tile, stride)
        for x0 in _starts(width, tile, stride)
    ]


def _ramp(length: int, overlap_in: int, overlap_out: int) -> mx.array:
    """Weights along one axis of a tile: linear ramps over the overlaps with the neighbours before and after."""
    pos = mx.arange(length, dtype=mx.float32) + 0.5
    w = mx.ones((length,), dtype=mx.float32)
    if overlap_in > 0:
        w = mx.minimum(w, pos / overlap_in)
    if overlap_out > 0:
        w = mx.minimum(w, (length - pos) / overlap_out)
    return w


def _axis_overlaps(spans: dict[int, int]) -> dict[int, tuple[int, int]]:
    """start -> (overlap with the previous tile, overlap with the next) along one axis."""
    starts = sorted(spans)
    out = {}
    for i, s in enumerate(starts):
        before = starts[i - 1] + spans[starts[i - 1]] - s if i > 0 else 0
        after = s + spans[s] - starts[i + 1] if i + 1 < len(starts) else 0
        out[s] = (max(before, 0), max(after, 0))
    return out


def blend_tiles(pieces: list[tuple[int, int, mx.array]], height: int, width: int) -> mx.array:
    """Blend (y0, x0, tile) pieces, channels-last ``(..., h, w, C)`` at output coordinates, into one image."""
    if len(pieces) == 1:
        return pieces[0][2]
    rows = _axis_overlaps({y0: t.shape[-3] for y0, _, t in pieces})
    cols = _axis_overlaps({x0: t.shape[-2] for _, x0, t in pieces})
    first = pieces[0][2]
    out = mx.zeros((*first.shape[:-3], height, width, first.shape[-1]), dtype=mx.float32)
    total = mx.zeros((height, width, 1), dtype=mx.float32)
    for y0, x0, t in pieces:
        h, w = t.shape[-3], t.shape[-2]
        weight = (_ramp(h, *rows[y0])[:, None] * _ramp(w, *cols[x0])[None, :])[:, :, None]
        out[..., y0 : y0 + h, x0 : x0 + w, :] += t.astype(mx.float32) * weight
        total[y0 : y0 + h, x0 : x0 + w, :] += weight
    return (out / total).astype(first.dtype)


def tiled_apply(fn: Callable[[mx.array], mx.array], x: mx.array, tile: int, overlap: int, scale: int) -> mx.array:
    """Run ``fn`` ((B, h, w, C) -> (B, h*scale, w*scale, C')) on overlapping tiles of ``x`` and blend them.

    Each tile is evaluated before the next starts, so only one tile's activations are alive at a time.
    """
    _, h, w, _ = x.shape
    pieces = []
    for y0, x0, th, tw in tile_windows(h, w, tile, overlap):
        part = fn(x[:, y0 : y0 + th, x0 : x0 + tw, :])
        mx.eval(part)
        pieces.append((y0 * scale, x0 * scale, part))
    return blend_tiles(pieces, h * scale, w * scale)
