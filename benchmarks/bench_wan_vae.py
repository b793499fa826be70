"""Wan2.2 VAE decode: MLX (ours) vs diffusers AutoencoderKLWan (PyTorch), same random weights, float32.

    python benchmarks/bench_wan_vae.py [--size full|small] [--height 128 --width 128 --frames 5]

Builds a Wan2.2-configured diffusers model with random weights (full widths 160/256, z 48 by default; ``--size
small`` uses 40/64), saves it, converts it with ``convert_wan_vae``, then times a whole-clip decode of the same
random flow latent (un-normalised for diffusers beforehand, as STARFlow's wrapper does) in two separate
processes: MLX with OpenBLAS preloaded, torch without it. Each process decodes the first latent frame once as a
warm-up, then the full clip (``--repeats`` times, best kept: torch's first full
decode is 3-4x slower than later ones while oneDNN prepares the new shapes). Peak memory: MLX's
``mx.get_peak_memory()`` during the timed decodes (array allocations, weights included), and for both the worker
process's max RSS (``getrusage``: weights, loading and decoding; each step runs in its own process).
Prints a markdown table and the max abs difference of the two outputs relative to the output scale.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
SIZES = {"full": (160, 256), "small": (40, 64)}


sys.path.insert(0, str(ROOT))  # the workers import starflow_mlx and tests from this checkout

def prepare(work: Path, size: str, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKLWan

    from starflow_mlx.convert.wan_vae import convert_wan_vae
    from starflow_mlx.wan_vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    if (work / "mlx" / "config.json").is_file():
        return
    base, dec = SIZES[size]
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=base, decoder_base_dim=dec, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
    )
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    vae.save_pretrained(work / "diffusers")
    del vae
    convert_wan_vae(work / "diffusers", work / "mlx", overwrite=True)


def worker_torch(work: Path, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKLWan
    from tests.conftest import diffusers_wan_decode_unclamped

    vae = AutoencoderKLWan.from_pretrained(work / "diffusers").eval()
    # latents.npy is STARFlow's flow latent (B, T, h, w, 48): undo its temporal scale and normalisation first
    cfg = json.loads((work / "mlx" / "config.json").read_text())
    z = np.load(work / "latents.npy")
    z[:, 1:] /= np.float32(cfg["temporal_scale"])
    z = z / (1 / np.array(cfg["latents_std"], np.float32)) + np.array(cfg["latents_mean"], np.float32)
    z = torch.from_numpy(z).permute(0, 4, 1, 2, 3).contiguous()  # -> (B, C, T, h, w)

    def decode(z):
        return diffusers_wan_decode_unclamped(vae, z)

    with torch.no_grad():
        decode(z[:, :, :1])
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            out = decode(z)
            best = min(best, time.perf_counter() - t)
    np.save(work / "out_torch.npy", out.permute(0, 2, 3, 4, 1).numpy())
    return {"seconds": best, "frames": out.shape[2], "threads": torch.get_num_threads()}


def worker_mlx(work: Path, repeats: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from starflow_mlx.wan_vae import load_wan_vae

    vae = load_wan_vae(work / "mlx")
    z = mx.array(np.load(work / "latents.npy"))
    mx.eval(vae.from_flow_latent(z[:, :1], channels_last=True))
    mx.reset_peak_memory()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = vae.from_flow_latent(z, channels_last=True)  # latents.npy is (B, T, h, w, 48)
        mx.eval(out)
        best = min(best, time.perf_counter() - t)
    peak = mx.get_peak_memory()
    np.save(work / "out_mlx.npy", np.array(out))
    weights = sum(v.nbytes for _, v in tree_flatten(vae.parameters()))
    return {"seconds": best, "frames": out.shape[1], "mlx_peak_bytes": peak, "weight_bytes": weights}


def run_worker(kind: str, args) -> dict:
    env = dict(os.environ)
    if kind == "mlx":
        env["LD_PRELOAD"] = OPENBLAS
    else:
        env.pop("LD_PRELOAD", None)
    cmd = [sys.executable, __file__, "--worker", kind, "--work", str(args.work), "--repeats", str(args.repeats),
           "--size", args.size, "--seed", str(args.seed)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{kind} worker failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--frames", type=int, default=5, help="output frames, 1 + 4k")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed decodes (best kept); the first is slow for torch (oneDNN sets up new shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default /tmp/bench_wan_vae_<size>)")
    p.add_argument("--worker", choices=["prepare", "torch", "mlx"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "prepare":
        prepare(args.work, args.size, args.seed)
        print("{}")
        return
    if args.worker:
        result = (worker_torch if args.worker == "torch" else worker_mlx)(args.work, args.repeats)
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return

    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        sys.exit("frames must be 1 + 4k, height and width multiples of 16")
    args.work = args.work or Path(f"/tmp/bench_wan_vae_{args.size}")
    args.work.mkdir(parents=True, exist_ok=True)
    # Every step runs in its own process: a child inherits its parent's max RSS, so the parent stays small.
    run_worker("prepare", args)
    latent_t = 1 + (args.frames - 1) // 4
    z = np.random.default_rng(args.seed).standard_normal((1, latent_t, args.height // 16, args.width // 16, 48))
    np.save(args.work / "latents.npy", z.astype(np.float32))

    results = {kind: run_worker(kind, args) for kind in ("torch", "mlx")}
    a, b = np.load(args.work / "out_mlx.npy"), np.load(args.work / "out_torch.npy")
    err = float(np.abs(a - b).max() / np.abs(b).max())

    base, dec = SIZES[args.size]
    print(f"\nWan2.2 VAE decode, widths {base}/{dec} (z 48), {args.frames} frames {args.height}x{args.width}, "
          f"float32, best of {args.repeats}, CPU ({os.cpu_count()} cores)\n")
    print("| implementation | decode s | s / output frame | peak MLX arrays GiB | max RSS GiB |")
    print("|---|---|---|---|---|")
    gib = 1 << 30
    from importlib.metadata import version

    for name, kind in ((f"diffusers {version('diffusers')} (torch {version('torch')})", "torch"),
                       (f"starflow-mlx (MLX {version('mlx')})", "mlx")):
        r = results[kind]
        peak = f"{r['mlx_peak_bytes'] / gib:.2f}" if "mlx_peak_bytes" in r else "n/a"
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / r['frames']:.2f} | {peak} | "
              f"{r['max_rss_bytes'] / gib:.2f} |")
    print(f"\nweights: {results['mlx']['weight_bytes'] / gib:.2f} GiB; max |MLX - torch| / max |torch| = {err:.2e}")


if __name__ == "__main__":
    main()
