"""The KV cache: keys rotated once at insert give exactly what rotating every cached key on every call gives (the
official cache), for one-token steps, Jacobi chunks with trimming, and a reset-and-re-encode; its sizing and its
mlx-lm-style surface."""

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.attention import Attention, KVCache
from starflow_mlx.rope import apply_rope, rope_table


def rotate_on_every_call(attention: Attention, inputs: list[mx.array], cos, sin) -> list[mx.array]:
    """The official scheme, written out: keep un-rotated keys, rotate all of them with rows 0..lk-1 on each call."""
    keys, values, outs = [], [], []
    for x in inputs:
        B, L, _ = x.shape
        q, k, v = mx.split(attention.qkv(attention.norm(x)), 3, axis=-1)
        q, k, v = (a.reshape(B, L, attention.num_heads, attention.head_dim).transpose(0, 2, 1, 3) for a in (q, k, v))
        keys.append(k)
        values.append(v)
        k_all, v_all = mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)
        lk = k_all.shape[2]
        q = apply_rope(q, cos[lk - L : lk], sin[lk - L : lk])
        k_all = apply_rope(k_all, cos[:lk], sin[:lk])
        mask = None if L == 1 else "causal"
        out = mx.fast.scaled_dot_product_attention(q, k_all, v_all, scale=attention.scale, mask=mask)
        outs.append(attention.proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)))
    return outs


@pytest.fixture
def setup():
    mx.random.seed(0)
    attention = Attention(64, 16)
    cos, sin = rope_table(4, 4, 4, 5, 4, 16)  # 5 text slots + 4 frames of 4x4
    inputs = [mx.random.normal((2, n, 64)) for n in (5, 1, 1, 4, 16, 1)]
    return attention, cos, sin, inputs


def test_rotate_at_insert_is_bit_identical(setup):
    attention, cos, sin, inputs = setup
    cache = KVCache(max_size=cos.shape[0])
    ours = [attention(x, cos, sin, "causal", cache) for x in inputs]
    official = rotate_on_every_call(attention, inputs, cos, sin)
    for a, b in zip(ours, official):
        assert np.array_equal(np.array(a), np.array(b))
    assert cache.offset == 28 and cache.keys.shape[2] == cos.shape[0]  # sized once from the known length


def test_trim_then_refeed_equals_a_single_feed(setup):
    """A Jacobi iteration feeds a chunk, trims it and feeds its next guess: only the last guess remains."""
    attention, cos, sin, inputs = setup
    a, b = KVCache(), KVCache()
    for x in inputs[:3]:
        attention(x, cos, sin, "causal", a)
        attention(x, cos, sin, "causal", b)
    guess, final = mx.random.normal((2, 4, 64)), inputs[3]
    attention(guess, cos, sin, "causal", a)
    assert a.trim(4) == 4 and a.offset == 7
    out_a = attention(final, cos, sin, "causal", a)
    out_b = attention(final, cos, sin, "causal", b)
    assert np.array_equal(np.array(out_a), np.array(out_b))
    assert np.array_equal(np.array(a.keys[:, :, : a.offset]), np.array(b.keys[:, :, : b.offset]))
    assert a.trim(100) == 11 and a.offset == 0  # trimming never goes below empty


def test_growth_reset_keep_batch_and_nbytes():
    cache = KVCache()
    k = mx.ones((2, 2, 300, 8))
    cache.update_and_fetch(k, k)
    assert cache.keys.shape[2] == 512 and cache.offset == 300  # steps of 256 without a known size
    assert cache.nbytes == 2 * 2 * 2 * 512 * 8 * 4
    cache.reset()
    assert cache.offset == 0 and cache.keys.shape[2] == 512  # buffers kept for the next window
    cache.keep_batch(1)
    assert cache.keys.shape[0] == 1 and cache.is_trimmable()
    assert KVCache().state == [] and KVCache().nbytes == 0
