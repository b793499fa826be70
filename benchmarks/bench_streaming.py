"""Time to the first streamed frame vs the whole clip (``Pipeline.stream``'s ``FramesDecoded``), on this machine.

A mid-size random-weight T2V pipeline built through the converters into a temporary folder: a flow 256 wide (6
blocks, a 4-layer deep block) on an 8x8 Wan2.2 latent grid (128x128 pixels), trained length 17 frames (5 latent),
the tests' tiny T5 and tiny-width Wan2.2 VAE; a clip 3x the training length (57 frames, 15 latent) through the
pipeline's sliding window (5 latent frames). Three runs: streamed with the learnable denoiser, streamed without it
(``denoise=False``), and not streamed (``stream_frames=False``: the same frames, denoised and decoded once sampling
is done). Times are from the first call of the stream; "latent frames sampled" counts the
``FrameSampled`` events before the first ``FramesDecoded``.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_streaming.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_checkpoint  # noqa: E402

PROMPT = "a red car"
YAML = """arguments:
- img_size: 128
- channel_size: 48
- patch_size: 1
- channels: 256
- top_block_channels: 256
- blocks: 6
- layers_per_block: 1 1 1 1 1 4
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
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 10
- noise_std: 0.3
- cond_noise_level: 1
- vid_size: '17:16'
- vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6
- text: tiny-64
- nvp: 1
- adaln: 0
"""


def build_pipeline(workdir: Path) -> Path:
    from starflow_mlx.convert.pipeline import convert_pipeline
    from tests.test_pipeline_folder import make_tiny_sources

    parts = workdir / "parts"
    parts.mkdir()
    sources = make_tiny_sources(parts)  # the tests' tiny T5 and Wan2.2 VAE; their tiny flows are not used
    checkpoint, yaml = make_checkpoint(workdir / "flow", YAML)
    return convert_pipeline(workdir / "pipeline", flow=checkpoint, config=yaml, t5=sources.t5, vae=sources.wan_vae)


def measure(pipeline, **settings) -> dict:
    """Seconds to the first FramesDecoded and to the end, latent frames sampled before the first one, the
    denoiser's passes, the record."""
    from starflow_mlx.pipeline import FramesDecoded, Generated
    from starflow_mlx.sampler import FrameSampled, FramesDenoised

    start = time.perf_counter()
    first = sampled_before = None
    sampled = passes = 0
    for event in pipeline.stream(PROMPT, "t2v", **settings):
        sampled += isinstance(event, FrameSampled)
        passes += isinstance(event, FramesDenoised)
        if isinstance(event, FramesDecoded) and first is None:
            first, sampled_before = time.perf_counter() - start, sampled
        if isinstance(event, Generated):
            return {"first": first, "total": time.perf_counter() - start, "sampled_before": sampled_before,
                    "passes": passes, "record": event.result.record}
    raise RuntimeError("no result")


def main():
    from starflow_mlx import Pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=57, help="pixel frames (57: 15 latent frames, 3x the training clip)")
    args = p.parse_args()

    pipeline = Pipeline.from_pretrained(build_pipeline(Path(tempfile.mkdtemp(prefix="bench_streaming_"))))
    measure(pipeline, frames=1, denoise=False)  # warm-up: one latent frame
    runs = {
        "streamed, denoiser": measure(pipeline, frames=args.frames),
        "streamed, --no-denoise": measure(pipeline, frames=args.frames, denoise=False),
        "not streamed, denoiser": measure(pipeline, frames=args.frames, stream_frames=False),
    }
    record = runs["streamed, denoiser"]["record"]
    latent = record["latent_shape"]
    deep = record["sampler"][max(record["sampler"], key=int)]
    print(f"latent {latent}, {record['frames']} frames of {record['size']}, guidance "
          f"{record['settings']['guidance']}, Jacobi; deep-block window moved {deep['reencodes']} times\n")
    print("| run | first frame (s) | whole clip (s) | first / whole | latent frames sampled before it | "
          "denoiser passes | stage seconds (sample / denoise / decode) |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        timings = run["record"]["timings"]
        stages = " / ".join(f"{timings.get(s, 0):.2f}" for s in ("sample", "denoise", "decode"))
        print(f"| {name} | {run['first']:.2f} | {run['total']:.2f} | {run['first'] / run['total']:.0%} | "
              f"{run['sampled_before']} of {latent[1]} | {run['passes']} | {stages} |")


if __name__ == "__main__":
    main()
