"""Transformer layers of the flow blocks: pre-norm LayerNorm attention with 3-D RoPE and a KV cache, GELU MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .rope import apply_rope


class KVCache:
    """Keys and values of one attention layer, *before* RoPE (the official cache stores un-rotated keys and
    re-rotates every cached key on each call, §8.2). Pre-allocated in steps; ``rollback`` discards the newest
    entries (Jacobi iterations), ``reset`` empties it (sliding window)."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.keys is None or self.offset + n > self.keys.shape[2]:
            capacity = ((self.offset + n + self.step - 1) // self.step) * self.step
            shape = (*keys.shape[:2], capacity, keys.shape[3])
            new_k, new_v = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if self.keys is not None and self.offset:
                new_k[:, :, : self.offset] = self.keys[:, :, : self.offset]
                new_v[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = new_k, new_v
        self.keys[:, :, self.offset : self.offset + n] = keys
        self.values[:, :, self.offset : self.offset + n] = values
        self.offset += n
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def rollback(self, n: int) -> None:
        self.offset = max(0, self.offset - n)

    def reset(self) -> None:
        self.offset = 0

    def keep_batch(self, n: int) -> None:
        """Keep the first ``n`` rows (drop the unconditional half after guided sampling)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[:n], self.values[:n]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class Attention(nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.num_heads = dims // head_dim
        self.head_dim = head_dim
        # (head_dim ** -0.25) ** 2 in the official code: 0.125 for head_dim 64 once in float32 (§8.8)
        self.scale = (head_dim**-0.25) ** 2
        self.norm = nn.LayerNorm(dims, eps=1e-5)
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)

    def __call__(self, x, cos, sin, mask=None, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = mx.split(self.qkv(self.norm(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        lq, lk = q.shape[2], k.shape[2]
        # Queries take the table rows of the newest slots, keys all rows from 0 (slot = cache index, §9.1).
        q = apply_rope(q, cos[lk - lq : lk], sin[lk - lq : lk]).astype(x.dtype)
        k = apply_rope(k, cos[:lk], sin[:lk]).astype(x.dtype)
        if isinstance(mask, str) and mask == "causal" and lq == 1:
            mask = None  # a single newest query sees every cached key
        out = mx.fast.scaled_dot_product_attention(q, k, v.astype(x.dtype), scale=self.scale, mask=mask)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, lq, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dims, eps=1e-5)
        self.fc1 = nn.Linear(dims, expansion * dims)
        self.fc2 = nn.Linear(expansion * dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(self.norm(x))))  # exact (erf) GELU, as torch.nn.GELU()


class TransformerLayer(nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.attention = Attention(dims, head_dim)
        self.mlp = MLP(dims)

    def __call__(self, x, cos, sin, mask=None, cache=None) -> mx.array:
        x = x + self.attention(x, cos, sin, mask, cache)
        return x + self.mlp(x)


class RMSNorm(nn.Module):
    """Final norm of a block: zero-initialised weight applied as (1 + w), computed in float32 (§9.6)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        w = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), w, self.eps).astype(x.dtype)
