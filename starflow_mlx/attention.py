"""Transformer layers of the flow blocks: pre-norm LayerNorm attention with 3-D RoPE and a KV cache (float, or
quantized to 8 or 4 bits), GELU MLP."""

from __future__ import annotations

import numbers

import mlx.core as mx
import mlx.nn as nn

from .rope import apply_rope


# A quantized KV cache (MLX affine packing along head_dim): bits per element, and elements per scale and bias.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
# Without an explicit group size: the first of these that divides head_dim (64 as mlx-lm; 32 for the heads of 32).
DEFAULT_KV_GROUP_SIZES = (64, 32)


def check_kv_choices(bits, group_size, owner: str = "") -> None:
    """``bits``: None (a float cache), 4 or 8; ``group_size``: None or one of ``KV_GROUP_SIZES``. ``owner``
    prefixes the names in errors (e.g. "Settings.")."""
    if bits is not None and not _one_of(bits, KV_BITS):
        raise ValueError(f"{owner}kv_bits must be one of {', '.join(map(str, KV_BITS))} (or None: a float cache), "
                         f"got {bits!r:.40}")
    if group_size is not None and not _one_of(group_size, KV_GROUP_SIZES):
        raise ValueError(f"{owner}kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))} (or None: "
                         f"64, or 32 where 64 does not divide head_dim), got {group_size!r:.40}")


def _one_of(value, choices: tuple[int, ...]) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in choices


def resolve_kv_group_size(bits, group_size, head_dim: int, owner: str = "") -> int | None:
    """The group size of a KV cache for heads of ``head_dim``: None for a float cache (``bits`` None; a group size
    is then refused), else ``group_size`` (it must divide head_dim) or, when None, the first of
    ``DEFAULT_KV_GROUP_SIZES`` that divides head_dim. The values as ``check_kv_choices`` takes them."""
    check_kv_choices(bits, group_size, owner)
    if bits is None:
        if group_size is not None:
            raise ValueError(f"{owner}kv_group_size {group_size} applies to a quantized KV cache: set "
                             f"{owner}kv_bits (4 or 8) with it")
        return None
    if group_size is None:
        fitting = [g for g in DEFAULT_KV_GROUP_SIZES if head_dim % g == 0]
        if not fitting:
            raise ValueError(f"{owner}kv_bits {bits} needs an attention head_dim that is a multiple of 32 (a "
                             f"quantization group), this flow's head_dim is {head_dim}")
        return fitting[0]
    if head_dim % group_size:
        raise ValueError(f"{owner}kv_group_size {group_size} must divide the attention head_dim {head_dim}")
    return group_size


class SlotCache:
    """Per-slot buffers of one attention layer, (B, heads, capacity, width) each, filled from slot 0 on.

    Slot positions are fixed (slot = cache index, §9.1) and a sliding-window re-encode resets the cache and
    re-inserts its tokens at their new slots. ``max_size`` (the block's known sequence length, from
    ``MetaBlock.make_cache``) sizes the buffers once; without it they grow in steps of 256. The surface follows
    mlx-lm's caches (``offset``, ``trim``, ``state``, ``nbytes``); subclasses say what the buffers hold."""

    step = 256

    def __init__(self, max_size: int | None = None):
        self.buffers: list[mx.array] | None = None
        self.offset = 0
        self.max_size = max_size

    def append(self, parts: list[mx.array]) -> list[mx.array]:
        """Write (B, heads, n, width) ``parts`` at slots offset .. offset + n - 1 of their buffers; return every
        buffer's filled slots."""
        n = parts[0].shape[2]
        needed = self.offset + n
        if self.buffers is None or needed > self.buffers[0].shape[2]:
            if self.max_size is not None and needed <= self.max_size:
                capacity = self.max_size
            else:
                capacity = ((needed + self.step - 1) // self.step) * self.step
            grown = [mx.zeros((*p.shape[:2], capacity, p.shape[3]), p.dtype) for p in parts]
            if self.buffers is not None and self.offset:
                for new, old in zip(grown, self.buffers):
                    new[:, :, : self.offset] = old[:, :, : self.offset]
            self.buffers = grown
        for buffer, part in zip(self.buffers, parts):
            buffer[:, :, self.offset : needed] = part
        self.offset = needed
        return [buffer[:, :, :needed] for buffer in self.buffers]

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
        if self.buffers is not None:
            self.buffers = [buffer[:n] for buffer in self.buffers]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.buffers is None else list(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class KVCache(SlotCache):
    """Keys and values of one attention layer in the compute dtype, keys stored *rotated* (RoPE applied once, at
    insert).

    Rotating at insert is bit-identical to the official cache, which stores un-rotated keys and re-rotates all of
    them on every call (§8.2), and it does O(new) work per call instead of O(cached)."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, heads, n, head_dim) rotated keys and values; return everything cached so far."""
        return tuple(self.append([keys, values]))

    @property
    def keys(self) -> mx.array | None:
        return None if self.buffers is None else self.buffers[0]

    @property
    def values(self) -> mx.array | None:
        return None if self.buffers is None else self.buffers[1]


class QuantizedKVCache(SlotCache):
    """A ``KVCache`` whose keys (rotated) and values are quantized at insert along head_dim (MLX affine: ``bits``
    per element, a scale and a bias per ``group_size`` elements, in the compute dtype), as mlx-lm's quantized cache.
    Attention reads it with ``quantized_attention``. Keys and values are each (packed uint32, scales, biases)."""

    def __init__(self, max_size: int | None, bits: int, group_size: int):
        if bits is None or group_size is None:
            raise ValueError(f"a QuantizedKVCache needs kv_bits and kv_group_size, got {bits} and {group_size}")
        check_kv_choices(bits, group_size)
        super().__init__(max_size)
        self.bits, self.group_size = bits, group_size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append (B, heads, n, head_dim) rotated keys and values; return everything cached so far, quantized."""
        parts = [*self.quantize(keys), *self.quantize(values)]
        fetched = self.append(parts)
        return tuple(fetched[:3]), tuple(fetched[3:])

    def quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    @property
    def keys(self) -> tuple[mx.array, mx.array, mx.array] | None:
        return None if self.buffers is None else tuple(self.buffers[:3])

    @property
    def values(self) -> tuple[mx.array, mx.array, mx.array] | None:
        return None if self.buffers is None else tuple(self.buffers[3:])


# Elements of the float32 score matrix one quantized attention pass may hold (256 MiB): a long causal chunk (a
# prefill, a sliding-window re-encode) is attended in runs of queries under this, evaluated one after the other,
# where the fused float kernel needs no such matrix.
MAX_SCORES = 2**26


def quantized_attention(q: mx.array, keys, values, scale: float, mask, bits: int, group_size: int) -> mx.array:
    """Attention of (B, heads, L, head_dim) queries, the newest L of the cached slots, on quantized keys and values
    ((packed, scales, biases), as ``QuantizedKVCache`` returns them): q.k^T and p.v as quantized matmuls, the
    softmax in float32. ``mask`` is None or "causal" (query i sees the keys up to its own slot, kL - L + i)."""
    B, heads, L, _ = q.shape
    kL = keys[0].shape[2]
    if mask is None:
        return _attend_quantized(q, keys, values, scale, None, bits, group_size)
    rows = max(1, MAX_SCORES // (B * heads * kL))
    if rows >= L:
        return _attend_quantized(q, keys, values, scale, kL - L, bits, group_size)
    outs = []
    for start in range(0, L, rows):
        last = kL - L + min(L, start + rows)  # a run of queries sees the keys up to its last slot only
        seen = [tuple(a[:, :, :last] for a in cached) for cached in (keys, values)]
        outs.append(_attend_quantized(q[:, :, start : start + rows], *seen, scale, kL - L + start, bits, group_size))
        mx.eval(outs[-1])  # frees this run's scores before the next run's
    return mx.concatenate(outs, axis=2)


def _attend_quantized(q, keys, values, scale: float, first: int | None, bits: int, group_size: int) -> mx.array:
    """Quantized attention of queries at slots ``first`` .. ``first + L - 1``, causal (None: every key visible)."""
    scores = mx.quantized_matmul(q * scale, *keys, transpose=True, group_size=group_size, bits=bits)
    scores = scores.astype(mx.float32)
    if first is not None:
        L, kL = scores.shape[-2:]
        visible = mx.arange(first, first + L)[:, None] >= mx.arange(kL)[None]
        scores = mx.where(visible, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1).astype(values[1].dtype)
    return mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)


def scaled_dot_product_attention(q: mx.array, k, v, scale: float, mask, cache: SlotCache | None) -> mx.array:
    """The attention of one layer, as its cache stores keys and values: MLX's fused attention on float ones,
    ``quantized_attention`` on a ``QuantizedKVCache``'s."""
    if isinstance(cache, QuantizedKVCache):
        return quantized_attention(q, k, v, scale, mask, cache.bits, cache.group_size)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


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

    def __call__(self, x, cos, sin, mask=None, cache: SlotCache | None = None) -> mx.array:
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
        out = scaled_dot_product_attention(q, k, v, self.scale, mask, cache)
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
