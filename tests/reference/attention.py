"""Transformer layers (mirror of starflow_mlx/attention.py), official module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope


class KVCache:
    """Rotated keys (RoPE applied at insert) and values of one layer; ``trim`` drops the newest entries."""

    def __init__(self, max_size=None):
        self.keys = self.values = None
        self.offset = 0
        self.max_size = max_size  # the MLX cache preallocates; this one concatenates

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys[:, :, : self.offset], keys], 2)
            self.values = torch.cat([self.values[:, :, : self.offset], values], 2)
        self.offset = self.keys.shape[2]
        return self.keys, self.values

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        self.keys, self.values = self.keys[:, :, : self.offset], self.values[:, :, : self.offset]
        return n

    def reset(self) -> None:
        self.keys = self.values = None
        self.offset = 0

    def keep_batch(self, n: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:n], self.values[:n]


class Attention(torch.nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = dims // head_dim, head_dim
        self.scale = (head_dim**-0.25) ** 2
        self.norm = torch.nn.LayerNorm(dims)
        self.qkv = torch.nn.Linear(dims, 3 * dims)
        self.proj = torch.nn.Linear(dims, dims)

    def forward(self, x, cos, sin, mask="causal", cache=None):
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(self.norm(x)).chunk(3, -1))
        start = 0 if cache is None else cache.offset
        q = apply_rope(q, cos[start : start + L], sin[start : start + L]).to(x.dtype)
        k = apply_rope(k, cos[start : start + L], sin[start : start + L]).to(x.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        lq, lk = q.shape[2], k.shape[2]
        if isinstance(mask, str):  # causal, bottom-right aligned when there are fewer queries than keys
            mask = None if lq == 1 else torch.ones(lq, lk, dtype=torch.bool, device=x.device).tril(lk - lq)
        out = F.scaled_dot_product_attention(q, k, v.to(x.dtype), attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, lq, -1))


class MLP(torch.nn.Module):
    def __init__(self, dims: int, expansion: int = 4):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dims)
        self.main = torch.nn.Sequential(
            torch.nn.Linear(dims, expansion * dims), torch.nn.GELU(), torch.nn.Linear(expansion * dims, dims)
        )

    def forward(self, x):
        return self.main(self.norm(x))


class TransformerLayer(torch.nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.attention = Attention(dims, head_dim)
        self.mlp = MLP(dims)

    def forward(self, x, cos, sin, mask="causal", cache=None):
        x = x + self.attention(x, cos, sin, mask, cache)
        return x + self.mlp(x)


class RMSNorm(torch.nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dims))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())
        return out.to(x.dtype)
