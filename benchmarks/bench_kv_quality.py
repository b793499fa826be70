"""The quantized KV cache (BENCHMARKS.md, "Quantized KV cache"): what it saves and costs, and what it changes.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_kv_quality.py [--seeds 2]

1. One attention layer over a long cache shaped like a deep block's (width 1024, head_dim 64, 8192 cached keys,
   batch 2 = one prompt with guidance), float32 / 8-bit / 4-bit: the cache's bytes, and the time of a one-token
   step (sequential) and a 64-token chunk (Jacobi). On a CPU the quantized matmuls are MLX's slow generic path.
2. The shipped shapes model (float32 weights) on the twelve held-out captions x ``--seeds`` seeds, float / 8-bit /
   4-bit deep caches: prompt accuracy, mean |delta bits/dim| of the samples (the forward pass itself has no cache),
   and the largest |delta| of the sampled latent against the float cache's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from starflow_mlx import Pipeline  # noqa: E402
from starflow_mlx.attention import Attention, KVCache, QuantizedKVCache  # noqa: E402
from starflow_mlx.media import to_uint8  # noqa: E402
from starflow_mlx.rope import rope_table  # noqa: E402
from tests.reference.shapes import HELD_OUT, analyse  # noqa: E402

KV = (None, 8, 4)
FILL = 512


def median_time(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cache_figures(args) -> None:
    mx.random.seed(0)
    attention = Attention(args.dims, args.head_dim)
    mx.eval(attention.parameters())
    side = int(np.ceil(np.sqrt((args.cached + 64) / 8)))
    cos, sin = rope_table(side, side, 8, 0, side, args.head_dim)
    prompt = mx.random.normal((args.batch, args.cached, args.dims))
    print(f"one attention layer, width {args.dims}, head_dim {args.head_dim}, batch {args.batch}, {args.cached} "
          f"cached keys, float32 compute, group size 64, median of {args.repeats}\n")
    print("| cache | bytes (MiB) | vs float | 1-token step (ms) | 64-token chunk (ms) |")
    print("|---|---|---|---|---|")
    float_bytes = None
    for bits in KV:
        size = args.cached + 64
        cache = KVCache(size) if bits is None else QuantizedKVCache(size, bits, 64)
        for start in range(0, args.cached, FILL):  # in chunks: a single 8192-query pass would hold GBs of scores
            mx.eval(attention(prompt[:, start : start + FILL], cos, sin, "causal", cache), cache.state)
        float_bytes = float_bytes or cache.nbytes
        row = ["float32" if bits is None else f"{bits}-bit", f"{cache.nbytes / 2**20:.1f}",
               f"{cache.nbytes / float_bytes:.3f}"]
        for n in (1, 64):
            x = mx.random.normal((args.batch, n, args.dims))

            def step():
                out = attention(x, cos, sin, "causal", cache)
                cache.trim(n)
                return out

            row.append(f"{1e3 * median_time(step, args.repeats):.1f}")
        print("| " + " | ".join(row) + " |")


def shipped_figures(args) -> None:
    pipeline = Pipeline.from_pretrained(args.model, "float32")
    pipeline.text_to_video(HELD_OUT[0], seed=0)  # warm-up
    runs = {}
    for kv in KV:
        start = time.perf_counter()
        runs[kv] = [(caption, pipeline.text_to_video(caption, seed=seed, kv_bits=kv))
                    for caption in HELD_OUT for seed in range(args.seeds)]
        runs[kv] = (runs[kv], (time.perf_counter() - start) / len(runs[kv]))
    print(f"\nshipped model, float32 weights, {len(HELD_OUT)} held-out captions x {args.seeds} seeds\n")
    print("| KV cache | prompt accuracy | mean bits/dim | mean abs delta bits/dim | max abs delta latent | s/clip |")
    print("|---|---|---|---|---|---|")
    reference = runs[None][0]
    for kv in KV:
        generations, seconds = runs[kv]
        correct = sum(analyse(to_uint8(g.frames[0])).matches(c) for c, g in generations)
        bits = np.array([g.record["bits_per_dim"][0] for _, g in generations])
        delta = np.abs(bits - np.array([g.record["bits_per_dim"][0] for _, g in reference]))
        latent = max(float(mx.abs(g.sampled - r.sampled).max()) for (_, g), (_, r) in zip(generations, reference))
        name = "float32" if kv is None else f"{kv}-bit"
        print(f"| {name} | {correct}/{len(generations)} | {bits.mean():.4f} | {delta.mean():.4f} (max "
              f"{delta.max():.4f}) | {latent:.3f} | {seconds:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cached", type=int, default=8192, help="keys already in the cache")
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt with guidance")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--skip-cache", action="store_true", help="only the shipped model's figures")
    args = p.parse_args()
    if not args.skip_cache:
        cache_figures(args)
    shipped_figures(args)


if __name__ == "__main__":
    main()
