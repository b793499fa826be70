"""3-D RoPE tables (mirror of starflow_mlx/rope.py), in torch."""

from __future__ import annotations

import math

import torch

THETA = 10000.0
THIRD_AXIS_DIMS = 8


def positions(h: int, w: int, frames: int, txt_len: int, pt_seq_len: int) -> torch.Tensor:
    mean_len = math.sqrt(h * w)
    rows = torch.arange(h) / mean_len * pt_seq_len
    cols = torch.arange(w) / mean_len * pt_seq_len
    pr, pc = (a.reshape(-1) for a in torch.meshgrid(rows, cols, indexing="ij"))
    frames = max(frames, 1)
    image = torch.stack(
        [pr.repeat(frames), pc.repeat(frames), torch.arange(frames, dtype=torch.float32).repeat_interleave(h * w)], -1
    )
    if txt_len == 0:
        return image
    text_pos = torch.arange(txt_len) / txt_len * pt_seq_len
    text = torch.stack([torch.zeros_like(text_pos), torch.zeros_like(text_pos), text_pos], -1)
    return torch.cat([text, image])


def angles(pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    spatial = head_dim // 2 - THIRD_AXIS_DIMS
    space = 1.0 / (THETA ** (torch.arange(0, spatial, 2).float() / spatial))
    third = 1.0 / (THETA ** (torch.arange(THIRD_AXIS_DIMS).float() / THIRD_AXIS_DIMS))
    theta = torch.cat([pos[:, :1] * space, pos[:, 1:2] * space, pos[:, 2:3] * third], -1)
    return theta.repeat_interleave(2, -1)


def rope_table(h, w, frames, txt_len, pt_seq_len, head_dim, device=None):
    theta = angles(positions(h, w, frames, txt_len, pt_seq_len), head_dim).to(device)
    return theta.cos(), theta.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * cos + rotated * sin
