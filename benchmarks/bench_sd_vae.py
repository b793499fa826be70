"""SD-VAE decode: MLX vs diffusers (PyTorch), float32, at the real sd-vae-ft-ema widths with random weights.

    python benchmarks/bench_sd_vae.py [--latent 32] [--batch 1] [--runs 3] [--encode]

The parent process builds a random diffusers ``AutoencoderKL`` with the sd-vae-ft-ema architecture, saves it, converts
it with ``convert_sd_vae`` and starts one worker process per framework: MLX with OpenBLAS preloaded
(``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0`` on Linux, as MLX's bundled BLAS is much slower) and torch
without it. Both decode the same latent; the parent checks that the two images agree and prints a markdown table.

Method:
- time: one cold call (includes MLX's graph building / torch's first-call setup), then the median of ``--runs`` calls;
- memory, both frameworks alike: a background thread samples the process RSS (``/proc/self/statm``) every 2 ms
  during the cold call; the figure is the peak RSS minus the RSS just before the call (the working memory on top of
  the loaded weights). For MLX, ``mx.get_peak_memory()`` (its allocator's own peak, which includes the weights) is
  reported too. ``ru_maxrss`` is not used: loading the weights may already have set a higher mark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
SD_VAE_FT_EMA = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
SCALE = 0.18215


class RssPeak:
    """Peak resident memory of this process above its level at ``start``, sampled by a thread."""

    def __init__(self, period: float = 0.002):
        self.period, self.page = period, os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _timed(fn, runs: int) -> tuple[float, list[float], float]:
    with RssPeak() as mem:
        t0 = time.perf_counter()
        fn()
        cold = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return cold, times, mem.delta_mib


def worker_mlx(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import numpy as np

    from starflow_mlx.sd_vae import load_sd_vae

    vae = load_sd_vae(args.work / "mlx")
    z = mx.array(np.load(args.work / "z.npy")) * SCALE
    result = {}
    out = {}

    def decode():
        out["image"] = vae.from_flow_latent(z)
        mx.eval(out["image"])

    mx.reset_peak_memory()
    before = mx.get_active_memory()
    cold, times, rss = _timed(decode, args.runs)
    result["decode"] = dict(cold=cold, times=times, rss_mib=rss,
                            mlx_peak_mib=mx.get_peak_memory() / 2**20, mlx_before_mib=before / 2**20)
    np.save(args.work / "mlx_image.npy", np.array(out["image"]))
    if args.encode:
        x = mx.array(np.load(args.work / "x.npy"))

        def encode():
            out["mean"] = vae.encode(x)[0]
            mx.eval(out["mean"])

        mx.reset_peak_memory()
        cold, times, rss = _timed(encode, args.runs)
        result["encode"] = dict(cold=cold, times=times, rss_mib=rss,
                                mlx_peak_mib=mx.get_peak_memory() / 2**20, mlx_before_mib=before / 2**20)
        np.save(args.work / "mlx_mean.npy", np.array(out["mean"]))
    result["version"] = f"mlx {mx.__version__}"
    return result


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.work / "diffusers").eval()
    z = torch.from_numpy(np.load(args.work / "z.npy"))
    result, out = {}, {}

    def decode():
        with torch.inference_mode():
            out["image"] = vae.decode(z).sample

    cold, times, rss = _timed(decode, args.runs)
    result["decode"] = dict(cold=cold, times=times, rss_mib=rss)
    np.save(args.work / "torch_image.npy", out["image"].numpy())
    if args.encode:
        x = torch.from_numpy(np.load(args.work / "x.npy"))

        def encode():
            with torch.inference_mode():
                out["mean"] = vae.encode(x).latent_dist.mean

        cold, times, rss = _timed(encode, args.runs)
        result["encode"] = dict(cold=cold, times=times, rss_mib=rss)
        np.save(args.work / "torch_mean.npy", out["mean"].numpy())
    result["version"] = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return result


def _run_worker(kind: str, args, work: Path) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if kind == "mlx" and Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    cmd = [sys.executable, __file__, "--worker", kind, "--work", str(work), "--runs", str(args.runs)]
    if args.encode:
        cmd.append("--encode")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=32, help="latent height and width (image is 8x)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="timed calls after the cold one")
    p.add_argument("--encode", action="store_true", help="also time encode of the matching image size")
    p.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        result = worker_mlx(args) if args.worker == "mlx" else worker_torch(args)
        print(json.dumps(result))
        return

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(ROOT))
    from starflow_mlx.convert.sd_vae import convert_sd_vae

    with tempfile.TemporaryDirectory(prefix="bench_sd_vae_") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_FT_EMA).save_pretrained(work / "diffusers")
        convert_sd_vae(work / "diffusers", work / "mlx")
        rng = np.random.default_rng(0)
        n, s = args.batch, args.latent
        np.save(work / "z.npy", rng.standard_normal((n, 4, s, s)).astype(np.float32))
        np.save(work / "x.npy", rng.uniform(-1, 1, (n, 3, 8 * s, 8 * s)).astype(np.float32))

        results = {kind: _run_worker(kind, args, work) for kind in ("mlx", "torch")}
        a, b = np.load(work / "mlx_image.npy"), np.load(work / "torch_image.npy")
        parity = {"decode": (float(np.abs(a - b).max()), float(np.abs(b).max()))}
        if args.encode:
            a, b = np.load(work / "mlx_mean.npy"), np.load(work / "torch_mean.npy")
            parity["encode"] = (float(np.abs(a - b).max()), float(np.abs(b).max()))

    print(f"SD-VAE (sd-vae-ft-ema widths, random weights), float32, batch {args.batch}, latent {s}x{s} -> image "
          f"{8 * s}x{8 * s}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{results['mlx']['version']}, {results['torch']['version']}\n")
    print("| op | framework | cold (s) | median of {} (s) | per image (s) | working mem, RSS delta (MiB) | "
          "MLX peak incl. weights (MiB) |".format(args.runs))
    print("|---|---|---|---|---|---|---|")
    for op in ("decode", "encode") if args.encode else ("decode",):
        for kind in ("mlx", "torch"):
            r = results[kind][op]
            med = float(np.median(r["times"])) if r["times"] else r["cold"]
            peak = f"{r['mlx_peak_mib']:.0f}" if "mlx_peak_mib" in r else "-"
            print(f"| {op} | {kind} | {r['cold']:.2f} | {med:.2f} | {med / args.batch:.2f} | {r['rss_mib']:.0f} | {peak} |")
    for op, (err, scale) in parity.items():
        print(f"\n{op} parity MLX vs diffusers: max abs {err:.2e}, output scale {scale:.3f}, relative {err / scale:.2e}")


if __name__ == "__main__":
    main()
