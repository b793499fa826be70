"""Spatial tiling shared by the VAE decoders: exact for local functions, validated arguments."""

import mlx.core as mx
import pytest

from starflow_mlx.tiling import TILE_OVERLAP, blend_tiles, default_overlap, tile_windows, tiled_apply


def test_tiled_apply_is_exact_for_local_functions():
    x = mx.random.normal((2, 21, 13, 3), key=mx.random.key(0))

    def local(t):  # nearest x4 upsampling then a pointwise map: tiling must not change it at all
        b, h, w, c = t.shape
        up = mx.broadcast_to(t[:, :, None, :, None, :], (b, h, 4, w, 4, c)).reshape(b, 4 * h, 4 * w, c)
        return mx.tanh(up) * 2 + 1

    want = local(x)
    for tile, overlap in [(8, 2), (5, 4), (7, 0), (16, 3), (32, 8)]:
        got = tiled_apply(local, x, tile, overlap, 4)
        assert got.shape == want.shape
        assert float(mx.abs(got - want).max()) < 1e-6, (tile, overlap)


def test_blend_tiles_reconstructs_consistent_video_tiles():
    canvas = mx.random.normal((1, 2, 40, 56, 3), key=mx.random.key(1))
    tiles = [(y, x, canvas[:, :, y : y + h, x : x + w]) for y, x, h, w in tile_windows(40, 56, 24, 8)]
    assert len(tiles) == 2 * 3
    assert float(mx.abs(blend_tiles(tiles, 40, 56) - canvas).max()) < 1e-6


def test_windows_cover_the_image_and_respect_the_overlap():
    windows = tile_windows(21, 13, 8, 3)
    assert {(y, x) for y, x, _, _ in windows} == {(y, x) for y in (0, 5, 10, 13) for x in (0, 5)}
    assert all(h == 8 and w == 8 for _, _, h, w in windows)
    assert tile_windows(6, 6, 8, 2) == [(0, 0, 6, 6)]
    with pytest.raises(ValueError, match="0 <= tile_overlap < tile_size, got 4 and 4"):
        tile_windows(10, 10, 4, 4)


def test_default_overlap_is_shared_and_capped():
    assert TILE_OVERLAP == 8
    assert default_overlap(64, None) == 8 and default_overlap(32, None) == 8
    assert default_overlap(10, None) == 5 and default_overlap(1, None) == 0  # at most half a tile
    assert default_overlap(64, 3) == 3 and default_overlap(64, 0) == 0  # an explicit overlap is kept
