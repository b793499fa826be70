"""Per-stage time and peak memory of a whole T2V pipeline (text, sample, denoise, decode) on this machine, with
the Jacobi solver and with the sequential inverse (MLX, float32, guided).

The pipeline is a mid-size random-weight one built through the converters (``convert_pipeline``) into a temporary
folder: a T2V-shaped flow 512 wide (6 blocks, a 6-layer deep block) on a 16x16 Wan2.2 latent grid (256x256 pixels)
of 5 latent frames (17 frames), the tiny T5 and tiny-width Wan2.2 VAE of the tests. Times come from the pipeline's
``StageFinished`` events; peak memory is ``mx.get_peak_memory()`` since ``mx.reset_peak_memory()`` at the stage's
``StageStarted``.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_pipeline.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_checkpoint  # noqa: E402

PROMPT = "a red car on a coastal road at sunset"
YAML = """arguments:
- img_size: 256
- channel_size: 48
- patch_size: 1
- channels: 512
- top_block_channels: 512
- blocks: 6
- layers_per_block: 1 1 1 1 1 6
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


def measure(pipeline, **settings) -> tuple[dict, dict]:
    """{stage: (seconds, peak bytes)} and the record of one generation."""
    import mlx.core as mx

    from starflow_mlx.pipeline import Generated, StageFinished, StageStarted

    stages, record = {}, None
    for event in pipeline.stream(PROMPT, "t2v", **settings):
        if isinstance(event, StageStarted):
            mx.reset_peak_memory()
        elif isinstance(event, StageFinished):
            stages[event.stage] = (event.seconds, mx.get_peak_memory())
        elif isinstance(event, Generated):
            record = event.result.record
    return stages, record


def main():
    import mlx.core as mx

    from starflow_mlx import Pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=17, help="pixel frames (17: 5 latent frames)")
    args = p.parse_args()

    folder = build_pipeline(Path(tempfile.mkdtemp(prefix="bench_pipeline_")))
    pipeline = Pipeline.from_pretrained(folder)
    flow = pipeline.flow.config
    measure(pipeline, frames=1, denoise=False)  # warm-up: one latent frame
    runs = {"jacobi": measure(pipeline, frames=args.frames, jacobi=True),
            "sequential": measure(pipeline, frames=args.frames, jacobi=False)}

    settings = runs["jacobi"][1]["settings"]
    latent = runs["jacobi"][1]["latent_shape"]
    print(f"flow {flow.channels} wide (deep block {flow.top_channels} x {flow.layers_per_block[-1]} layers), "
          f"latent {latent}, {settings['frames']} frames of {runs['jacobi'][1]['size']}, guidance "
          f"{settings['guidance']}, Jacobi block {settings['jacobi_block_size']} th {settings['jacobi_threshold']}; "
          f"weights {mx.get_active_memory() / 2**20:.0f} MiB active after the runs\n")
    print("| solver | stage | time (s) | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name, (stages, _) in runs.items():
        for stage, (seconds, peak) in stages.items():
            print(f"| {name} | {stage} | {seconds:.2f} | {peak / 2**20:.0f} |")
        print(f"| {name} | **total** | {sum(s for s, _ in stages.values()):.2f} | "
              f"{max(m for _, m in stages.values()) / 2**20:.0f} |")
    for name, (_, record) in runs.items():
        deep = record["sampler"][max(record["sampler"], key=int)]
        print(f"\n{name}: deep block {deep['passes']} passes in {deep['chunks']} chunks; "
              f"bits/dim of the sample {record['bits_per_dim'][0]:.4f}")

if __name__ == "__main__":
    main()
