"""Will it fit my Mac? The memory planner's figures for the released models, and its accuracy on this CPU.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_memory.py [--measure]

Prints Markdown tables (the "Memory" section of BENCHMARKS.md):

1. STARFlow-V 7B T2V (480p 16:9, guidance 3.5: 5 s = 81 frames, 10 s = 161, 30 s = 481 at 16 fps) and STARFlow
   3B T2I (256x256, guidance 3.6) at 16/8/4-bit weights and float/8/4-bit KV cache, on the "gpu" backend: the
   predicted peak, its stage, and the smallest of 16/24/32/64 GB Macs whose recommended working set (Metal's
   ``max_recommended_working_set_size``, about 75% of RAM) holds it. Three settings: everything resident (the
   pipeline's defaults: frames streamed, no tiles), and the low-memory plan (each part loaded for its stages, VAE
   decode in 16-latent-pixel tiles) with frames streamed (denoised and decoded beside the deep block's KV cache)
   and not streamed (after sampling).
2. The planner on ``bench_pipeline.py``'s configuration against the peaks the "Pipeline" section measured.
3. With ``--measure``: the planner against the measured peak (``mx.get_peak_memory``) on scaled random-weight
   pipelines on this CPU (``benchmarks/calibrate_memory.py``'s cases), stage by stage.

The GPU figures are predictions: no Metal device was measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starflow_mlx import memory  # noqa: E402

MACS_GB = (16, 24, 32, 64)
WORKING_SET_SHARE = 0.75  # Metal's recommended working set is about 75% of a Mac's RAM
CLIPS = {"5 s": 81, "10 s": 161, "30 s": 481}
WEIGHTS = {"16-bit": None, "8-bit": 8, "4-bit": 4}
CACHES = {"float KV": None, "8-bit KV": 8, "4-bit KV": 4}
SETUPS = {
    "everything resident, frames streamed, no tiles": {},
    "low memory, 16-pixel decode tiles, frames streamed": {"low_memory": True, "decode_tile_size": 16},
    "low memory, 16-pixel decode tiles, frames after sampling": {"low_memory": True, "decode_tile_size": 16,
                                                                  "stream_frames": False},
}
GOAL = {"low_memory": True, "decode_tile_size": 16, "stream_frames": False}


def smallest_mac(peak: int) -> str:
    for ram in MACS_GB:
        if peak <= ram * 1e9 * WORKING_SET_SHARE:
            return f"{ram} GB"
    return "none"


def cell(plan: memory.MemoryPlan) -> str:
    return f"{plan.peak / memory.GB:.1f} GB ({plan.peak_stage}) → {smallest_mac(plan.peak)}"


def released_table(name: str, task: str, rows: dict, setup: dict) -> list[str]:
    spec = memory.preset(name)
    lines = [f"| {'clip, ' if task == 't2v' else ''}weights | " + " | ".join(CACHES) + " |",
             "|---|" + "---|" * len(CACHES)]
    for row, frames in rows.items():
        for weights, q_bits in WEIGHTS.items():
            cells = []
            for kv_bits in CACHES.values():
                request = memory.Request(task=task, frames=frames, q_bits=q_bits, kv_bits=kv_bits, backend="gpu",
                                         **setup)
                cells.append(cell(memory.plan(spec, request)))
            label = f"{row}, {weights}" if task == "t2v" else weights
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def goal_plan() -> list[str]:
    """The issue's goal: 7B T2V, 5 s 480p with guidance, 4-bit weights and 4-bit KV, its lowest plan."""
    request = memory.Request(task="t2v", q_bits=4, kv_bits=4, backend="gpu", **GOAL)
    return ["```", *memory.plan(memory.preset("t2v-7b"), request).explain(), "```"]


def measured_table() -> list[str]:
    from benchmarks.calibrate_memory import CASES, compare, measure

    lines = ["| case (set) | stage | measured MB | planned MB | error |", "|---|---|---|---|---|"]
    errors = []
    for set_name in ("test", "calibration"):
        for name, case in CASES[set_name].items():
            for stage, got, want in compare(case, measure(case)):
                errors.append(abs(want / got - 1)) if set_name == "test" else None
                lines.append(f"| {name} ({set_name}) | {stage} | {got / 1e6:.1f} | {want / 1e6:.1f} | "
                             f"{100 * (want / got - 1):+.1f}% |")
    lines.append("")
    lines.append(f"Largest error on the checked (test) cases: {100 * max(errors):.1f}% over {len(errors)} stages.")
    return lines


# The "Pipeline: time and peak memory per stage" section of BENCHMARKS.md (bench_pipeline.py, Jacobi run), MiB.
PIPELINE_SECTION_MIB = {"text": 257, "sample": 353, "denoise": 374, "decode": 1312}


def pipeline_section_check() -> list[str]:
    """The planner on bench_pipeline.py's configuration, against the peaks that section measured."""
    import yaml

    from benchmarks.bench_pipeline import YAML
    from starflow_mlx.config import PipelineConfig, config_from_official, official_args
    from starflow_mlx.t5 import T5Config
    from starflow_mlx.wan_vae import WanVAEConfig

    flow = config_from_official(official_args(yaml.safe_load(YAML), "bench_pipeline"), "bench_pipeline", 64)
    text = T5Config(vocab_size=203, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=12)
    spec = memory.ModelSpec("bench_pipeline", PipelineConfig.for_flow(flow), flow, text,
                            WanVAEConfig(base_dim=16, decoder_base_dim=24),
                            {"flow": "float32", "text": "float32", "vae": "float32"})
    # that section was measured before frames streamed: frames after sampling, scoring in its sample stage
    plan = memory.plan(spec, memory.Request(task="t2v", frames=17, backend="cpu", stream_frames=False))
    lines = ["| stage | measured MiB | planned MiB | error |", "|---|---|---|---|"]
    for stage, measured in PIPELINE_SECTION_MIB.items():
        planned = max(plan.stage(s).mlx_peak for s in ((stage, "score") if stage == "sample" else (stage,))) / 2**20
        lines.append(f"| {stage} | {measured} | {planned:.0f} | {100 * (planned / measured - 1):+.1f}% |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also measure the scaled cases on this CPU")
    args = parser.parse_args(argv)
    out = []
    for title, setup in SETUPS.items():
        out += [f"**STARFlow-V 7B T2V, 480p 16:9, guidance 3.5 ({title})**", ""]
        out += released_table("t2v-7b", "t2v", CLIPS, setup) + [""]
        if "stream_frames" not in setup:  # an image never streams
            out += [f"**STARFlow 3B T2I, 256x256, guidance 3.6 ({title.replace(', frames streamed', '')})**", ""]
            out += released_table("t2i-3b", "t2i", {"image": 1}, setup) + [""]
    out += ["**The issue's goal: 7B T2V, 5 s, 4-bit weights, 4-bit KV cache (low memory, 16-pixel tiles, frames "
            "after sampling)**", ""]
    out += goal_plan() + [""]
    out += ["**Planned vs the \"Pipeline\" section's measured peaks** (bench_pipeline.py's configuration)", ""]
    out += pipeline_section_check() + [""]
    if args.measure:
        out += ["**Planned vs measured on this CPU (scaled random-weight pipelines)**", ""] + measured_table()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
