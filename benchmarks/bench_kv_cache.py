"""One attention layer over a long KV cache: keys rotated once at insert (ours) vs every cached key re-rotated on
every call (the official cache, §8.2), for a one-token step (sequential) and a 64-token chunk (Jacobi).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_kv_cache.py

Both schemes give bit-identical outputs (asserted here and in tests/test_kv_cache.py); only the time differs.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.attention import Attention, KVCache
from starflow_mlx.rope import apply_rope, rope_table


class RotateEveryCall:
    """The official scheme (and ours before): the same preallocated cache holding un-rotated keys, all of them
    rotated with rows 0..lk-1 on each call."""

    def __init__(self, attention: Attention, max_size: int):
        self.attention, self.cache = attention, KVCache(max_size)

    def __call__(self, x, cos, sin):
        a = self.attention
        B, L, _ = x.shape
        q, k, v = mx.split(a.qkv(a.norm(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, L, a.num_heads, a.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
        k_all, v_all = self.cache.update_and_fetch(k, v)
        lk = k_all.shape[2]
        q = apply_rope(q, cos[lk - L : lk], sin[lk - L : lk])
        k_all = apply_rope(k_all, cos[:lk], sin[:lk])
        out = mx.fast.scaled_dot_product_attention(q, k_all, v_all, scale=a.scale, mask=None if L == 1 else "causal")
        return a.proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def timed(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cached", type=int, default=8192, help="keys already in the cache")
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt with guidance")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    mx.random.seed(0)
    attention = Attention(args.dims, args.head_dim)
    mx.eval(attention.parameters())
    side = int(np.ceil(np.sqrt((args.cached + 64) / 8)))
    cos, sin = rope_table(side, side, 8, 0, side, args.head_dim)  # enough slots for the cache and a chunk
    prompt = mx.random.normal((args.batch, args.cached, args.dims))

    ours = KVCache(max_size=args.cached + 64)
    mx.eval(attention(prompt, cos, sin, "causal", ours))
    official = RotateEveryCall(attention, args.cached + 64)
    mx.eval(official(prompt, cos, sin))

    print(f"one attention layer, width {args.dims}, head_dim {args.head_dim}, batch {args.batch}, "
          f"{args.cached} cached keys, float32, median of {args.repeats}\n")
    print("| step | rotate every call (ms) | rotate at insert (ms) | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for name, n in (("sequential (1 token)", 1), ("Jacobi chunk (64 tokens)", 64)):
        x = mx.random.normal((args.batch, n, args.dims))

        def step_ours():
            out = attention(x, cos, sin, "causal", ours)
            ours.trim(n)
            return out

        def step_official():
            out = official(x, cos, sin)
            official.cache.trim(n)
            return out

        a, b = step_ours(), step_official()
        diff = float(mx.abs(a - b).max())
        t_official, t_ours = timed(step_official, args.repeats), timed(step_ours, args.repeats)
        print(f"| {name} | {1e3 * t_official:.1f} | {1e3 * t_ours:.1f} | {t_official / t_ours:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
