"""3-D rotary position embedding of STARFlow (spec §4.6).

Every block, shallow or deep, uses the 3-D form because the model is text-conditioned: the rotary half-dimension
is split into [head_dim/2 - 8] spatial frequencies (shared by rows and columns) and 8 frequencies for the third axis
(frame index for video, 0 for images, a text position for text rows). Tables are indexed by sequence *slot*, never
permuted with the tokens (pitfall §9.1).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

THETA = 10000.0
THIRD_AXIS_DIMS = 8


def positions(h: int, w: int, frames: int, txt_len: int, pt_seq_len: int) -> np.ndarray:
    """(txt_len + frames*h*w, 3) float32 slot positions: (row, column, frame or text position).

    The float32 operation order matches the official code: (index / sqrt(h*w)) * pt_seq_len for space,
    (i / txt_len) * pt_seq_len for text, the raw frame index for time.
    """
    f32 = np.float32
    mean_len = f32(np.sqrt(h * w))
    rows = np.arange(h, dtype=f32) / mean_len * f32(pt_seq_len)
    cols = np.arange(w, dtype=f32) / mean_len * f32(pt_seq_len)
    pr, pc = (a.reshape(-1) for a in np.meshgrid(rows, cols, indexing="ij"))
    frames = max(frames, 1)
    image = np.stack(
        [np.tile(pr, frames), np.tile(pc, frames), np.repeat(np.arange(frames, dtype=f32), h * w)], axis=-1
    )
    if txt_len == 0:
        return image
    text_pos = np.arange(txt_len, dtype=f32) / f32(txt_len) * f32(pt_seq_len)
    text = np.stack([np.zeros_like(text_pos), np.zeros_like(text_pos), text_pos], axis=-1)
    return np.concatenate([text, image], axis=0)


def frequencies(head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    spatial = head_dim // 2 - THIRD_AXIS_DIMS
    f32 = np.float32
    space = f32(1.0) / (f32(THETA) ** (np.arange(0, spatial, 2, dtype=f32) / f32(spatial))) if spatial else np.zeros(0, f32)
    third = f32(1.0) / (f32(THETA) ** (np.arange(THIRD_AXIS_DIMS, dtype=f32) / f32(THIRD_AXIS_DIMS)))
    return space.astype(f32), third.astype(f32)


def angles(pos: np.ndarray, head_dim: int) -> np.ndarray:
    """(S, head_dim) rotation angles, each frequency duplicated on adjacent pairs ([t0, t0, t1, t1, ...])."""
    space, third = frequencies(head_dim)
    theta = np.concatenate(
        [pos[:, :1] * space[None], pos[:, 1:2] * space[None], pos[:, 2:3] * third[None]], axis=-1
    ).astype(np.float32)
    return np.repeat(theta, 2, axis=-1)


@lru_cache(maxsize=32)
def rope_table(h: int, w: int, frames: int, txt_len: int, pt_seq_len: int, head_dim: int) -> tuple[mx.array, mx.array]:
    """cos and sin tables, (S, head_dim) float32, for one block's slot layout."""
    theta = mx.array(angles(positions(h, w, frames, txt_len, pt_seq_len), head_dim))
    return mx.cos(theta), mx.sin(theta)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent pairs (GPT-J layout): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin
