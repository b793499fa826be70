"""MLX flow vs the PyTorch reference on this machine: forward NLL throughput and sequential-inverse time.

Same mid-size T2V-shaped configuration and the same random weights (the reference's state_dict, converted) for
both. Each measurement runs in its own process so the OpenBLAS preload can be chosen per implementation:

    python benchmarks/bench_flow.py                 # runs everything, prints a markdown table
    python benchmarks/bench_flow.py --impl mlx      # one implementation (JSON line)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OPENBLAS, make_checkpoint, mlx_model, timed  # noqa: E402

YAML = """arguments:
- img_size: 16
- channel_size: 16
- patch_size: 1
- channels: 512
- blocks: 6
- layers_per_block: 2 2 2 2 2 8
- head_dim: 64
- rope: 1
- sos: 1
- txt_size: 32
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- soft_clip: 4
- temporal_causal: 2
- shallow_block_local: 1
- vae: none
- text: tiny-256
"""
FRAMES, BATCH = 8, 1  # forward: 1 clip of 8 latent frames of 16x16 (2048 tokens)
INV_FRAMES = 1  # sequential inverse: 1 latent frame (256 tokens per block), guided (batch 2)


def inputs(config):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, FRAMES, config.in_channels, config.img_size, config.img_size)).astype("float32")
    y = rng.standard_normal((2, config.txt_size, config.txt_dim)).astype("float32")
    return x, y


def run_mlx(workdir: Path, repeats: int) -> dict:
    import mlx.core as mx

    from starflow_mlx.sampler import SamplerOptions

    model = mlx_model(workdir)
    x, y = (mx.array(a) for a in inputs(model.config))
    fwd = timed(lambda: mx.eval(model.nll(x, y[:BATCH])), repeats)
    z = x[:1, :INV_FRAMES]
    inv = timed(lambda: mx.eval(model.reverse(z, y[:1], y[1:], SamplerOptions(guidance=3.0))), 1, warmup=False)
    return {"impl": "mlx", "forward_s": fwd, "inverse_s": inv}


def run_torch(workdir: Path, repeats: int) -> dict:
    import torch

    from starflow_mlx.config import load_official_yaml
    from starflow_mlx.sampler import SamplerOptions
    from tests.reference import StarFlow, load_official_state_dict

    config = load_official_yaml(workdir / "config.yaml")
    model = StarFlow(config).eval()
    load_official_state_dict(model, torch.load(workdir / "model.pth", weights_only=True))
    x, y = (torch.from_numpy(a) for a in inputs(config))
    with torch.no_grad():
        fwd = timed(lambda: model(x, y[:BATCH]).nll(), repeats)
        z = x[:1, :INV_FRAMES]
        inv = timed(lambda: model.reverse(z, y[:1], y[1:], SamplerOptions(guidance=3.0)), 1, warmup=False)
    return {"impl": "torch", "forward_s": fwd, "inverse_s": inv, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["mlx", "torch"])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.impl:
        result = (run_mlx if args.impl == "mlx" else run_torch)(args.workdir, args.repeats)
        print(json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench_flow_"))
    make_checkpoint(workdir, YAML)
    runs = [("mlx", True), ("torch", False), ("torch", True)]
    results = []
    for impl, preload in runs:
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if preload and Path(OPENBLAS).exists():
            env["LD_PRELOAD"] = OPENBLAS
        cmd = [sys.executable, __file__, "--impl", impl, "--workdir", str(workdir), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        r["openblas_preload"] = preload
        results.append(r)

    tokens = BATCH * FRAMES * 16 * 16
    inv_tokens = INV_FRAMES * 16 * 16 * 6
    mlx_r = results[0]
    print(f"forward: {BATCH} clip(s) x {FRAMES} frames x 16x16 latent ({tokens} tokens through 6 blocks); "
          f"sequential inverse: {INV_FRAMES} frame, guided, {inv_tokens} token steps\n")
    print("| implementation | OpenBLAS preload | forward NLL (s) | forward tokens/s | sequential inverse (s) | "
          "MLX speed-up fwd / inv |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['impl']} | {'yes' if r['openblas_preload'] else 'no'} | {r['forward_s']:.3f} | "
              f"{tokens / r['forward_s']:.0f} | {r['inverse_s']:.2f} | "
              f"{r['forward_s'] / mlx_r['forward_s']:.2f}x / {r['inverse_s'] / mlx_r['inverse_s']:.2f}x |")


if __name__ == "__main__":
    main()
