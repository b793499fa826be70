"""Jacobi vs sequential inversion of a mid-size T2V-shaped flow on this machine (MLX, float32, guided).

Reports deep-block passes and wall time as ratios to the sequential inverse, at threshold 1e-3 (the official
scripts' setting) and at a tight threshold, and the max difference of the samples. Random weights: how fast
Jacobi converges depends on the trained weights, so the pass counts here are a property of this random model.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_jacobi.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_checkpoint, mlx_model  # noqa: E402

YAML = """arguments:
- img_size: 8
- channel_size: 16
- patch_size: 1
- channels: 256
- top_block_channels: 384
- blocks: 6
- layers_per_block: 1 1 1 1 1 6
- head_dim: 64
- rope: 1
- sos: 1
- txt_size: 16
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- soft_clip: 4
- temporal_causal: 2
- shallow_block_local: 1
- vae: none
- text: tiny-128
"""


def main():
    import mlx.core as mx
    import numpy as np

    from starflow_mlx.sampler import SEQUENTIAL, Jacobi, SamplerOptions, stream_sample

    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--block-size", type=int, default=8, help="Jacobi chunk in frame 0 (x4 after); 8 of 64 tokens")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_jacobi_"))
    make_checkpoint(workdir, YAML)
    model = mlx_model(workdir)
    c = model.config
    rng = np.random.default_rng(0)
    z = mx.array(rng.standard_normal((1, args.frames, c.in_channels, c.img_size, c.img_size)).astype(np.float32))
    y = mx.array(rng.standard_normal((1, c.txt_size, c.txt_dim)).astype(np.float32))
    y_null = mx.array(rng.standard_normal((1, c.txt_size, c.txt_dim)).astype(np.float32))
    model.reverse(z[:, :1], y, y_null, SamplerOptions(guidance=3.0, solver=Jacobi(block_size=args.block_size)))  # warm-up

    runs = [("sequential", SEQUENTIAL), ("jacobi th=1e-3", Jacobi(block_size=args.block_size, threshold=1e-3)),
            ("jacobi th=1e-8", Jacobi(block_size=args.block_size, threshold=1e-8, max_iter=200))]
    results = {}
    for name, solver in runs:
        start = time.perf_counter()
        *_, final = stream_sample(model, z, y, y_null, SamplerOptions(guidance=3.0, solver=solver))
        out, stats = final.latent, final.stats
        mx.eval(out)
        results[name] = (time.perf_counter() - start, stats, out)

    seq_time, seq_stats, seq_out = results["sequential"]
    tokens = args.frames * c.img_size**2
    print(f"{args.frames} latent frames x {c.img_size}x{c.img_size} ({tokens} tokens), deep block "
          f"{c.top_channels} wide x {c.layers_per_block[-1]} layers, guided (batch 2), Jacobi block "
          f"{args.block_size}\n")
    print("| solver | deep-block passes | passes vs sequential | max iterations/chunk | wall (s) | "
          "speed-up | max abs diff vs sequential |")
    print("|---|---|---|---|---|---|---|")
    for name, (secs, stats, out) in results.items():
        d = stats.deep
        print(f"| {name} | {d.passes} | {d.passes / seq_stats.deep.passes:.3f} | {max(d.iterations)} | {secs:.2f} | "
              f"{seq_time / secs:.2f}x | {float(mx.abs(out - seq_out).max()):.2e} |")


if __name__ == "__main__":
    main()
