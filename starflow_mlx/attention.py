"""Transformer layers of the flow blocks: pre-norm LayerNorm attention with 3-D RoPE and a KV cache, GELU MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .rope import apply_rope


class KVCache:
    """Keys and values of one attention layer, keys stored *rotated* (RoPE applied once, at insert).

    Slot positions are fixed (slot = cache index, §9.1) and a sliding-window re-encode resets the cache and
    re-inserts its tokens at their new slots, so rotating at insert is bit-identical to the official cache, which
    stores un-rotated keys and re-rotates all of them on every call (§8.2), and it does O(new) work per call
    instead of O(cached). ``max_size`` (the block's known sequence length, from ``MetaBlock.make_cache``) sizes the
    buffers once; without it they grow in steps of 256. The surface follows mlx-lm's caches (``offset``, ``trim``,
    ``state``, ``nbytes``) so that a quantized cache can implement the same one.
    """

    step = 256

    def __init__(self, max_size: int | None = None):
        self.keys = None
        self.values = None
        self.offset = 0
        self.max_size = max_size

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, heads, n, head_dim) rotated keys and values; return everything cached so far."""
        n = keys.shape[2]
        if self.keys is None or self.offset + n > self.keys.shape[2]:
            needed = self.offset + n
            if self.max_size is not None and needed <= self.max_size:
                capacity = self.max_size
            else:
                capacity = ((needed + self.step - 1) // self.step) * self.step
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

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Discard the newest ``n`` entries (a Jacobi iteration's keys); returns how many were discarded."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (the sliding window restarts from slot 0)."""
        self.offset = 0

    def keep_batch(self, n: int) -> None:
        """Keep the first ``n`` rows (drop the unconditional half after guided sampling)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[:n], self.values[:n]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


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
        # The new tokens sit at slots offset .. offset + L - 1 (slot = cache index, §9.1): queries and keys take
        # those table rows, and keys are cached already rotated.
        start = 0 if cache is None else cache.offset
        q = apply_rope(q, cos[start : start + L], sin[start : start + L]).astype(x.dtype)
        k = apply_rope(k, cos[start : start + L], sin[start : start + L]).astype(x.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(mask, str) and mask == "causal" and L == 1:
            mask = None  # a single newest query sees every cached key
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


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
