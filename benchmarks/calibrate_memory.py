"""Calibrate and check the memory planner (``starflow_mlx.memory``) against measured peaks on this CPU.

    python benchmarks/calibrate_memory.py [--cases calibration|test] [--fit] [--json OUT]

Each case (a scaled random-weight pipeline, ``benchmarks.memory_probe``) runs in a fresh subprocess; the table
gives, per stage, the measured MLX peak, the planned one (``StagePlan.mlx_peak``: host-side numpy frames are not
in MLX's counters) and their ratio. The CPU constants of ``memory.py`` (``CONSTANTS``) are fitted (``--fit``) on
the ``calibration`` cases (each makes one term dominate one stage: attention scores, quantized-KV scores, the MLP,
the VAE convolutions, the gradient step); ``tests/test_memory.py`` checks the planner on the ``test`` cases, which
differ in every size and cover every way the pipeline runs. After the pipeline changes, re-run it with ``--fit``
and paste the constants.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.memory_probe import part_configs  # noqa: E402
from starflow_mlx import hub, memory  # noqa: E402
from starflow_mlx.config import PipelineConfig  # noqa: E402
from starflow_mlx.t5 import T5Config  # noqa: E402
from starflow_mlx.weights import read_config  # noqa: E402

STAGE_ORDER = memory.STAGES
Z16 = {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
WAN_SMALL = {"base_dim": 16, "decoder_base_dim": 32, "dim_mult": [1, 2, 2, 2], **Z16}
VIDEO_FLOW = {
    "in_channels": 16, "img_size": 8, "channels": 128, "top_block_channels": 256, "layers_per_block": [1, 1, 4],
    "txt_size": 32, "head_dim": 32, "temporal_causal": 2, "shallow_block_local": True,
    "learnable_self_denoiser": True, "conditional_denoiser": True, "denoiser_window": 10, "vid_size": "17:8",
    "soft_clip": 4.0,
}
IMAGE_FLOW = {
    "in_channels": 4, "img_size": 16, "channels": 128, "layers_per_block": [1, 3], "txt_size": 32, "head_dim": 32,
    "soft_clip": 4.0,
}
SD_SMALL = {"block_out_channels": [32, 64, 64], "norm_num_groups": 8}

# Calibration: each makes one term dominate a stage (frames after sampling where it is the flow's term).
CALIBRATION = {
    "video-scores": {"task": "t2v", "flow": {**VIDEO_FLOW, "img_size": 12}, "vae": WAN_SMALL,
                     "settings": {"frames": 17, "guidance": 3.0, "jacobi_block_size": 64, "stream_frames": False}},
    "video-mlp": {"task": "t2v", "flow": {**VIDEO_FLOW, "channels": 256, "top_block_channels": 512, "head_dim": 64},
                  "vae": {**WAN_SMALL, "decoder_base_dim": 16},
                  "settings": {"frames": 9, "guidance": 0.0, "stream_frames": False}},
    "image-gradient": {"task": "t2i", "flow": IMAGE_FLOW, "vae": SD_SMALL, "settings": {"guidance": 2.0}},
    "video-vae-wide": {"task": "t2v", "flow": {**VIDEO_FLOW, "img_size": 6},
                       "vae": {**WAN_SMALL, "decoder_base_dim": 48},
                       "settings": {"frames": 9, "guidance": 1.0}},
    "video-vae-deep": {"task": "t2v", "flow": {**VIDEO_FLOW, "img_size": 6},
                       "vae": {**WAN_SMALL, "dim_mult": [1, 2, 4, 4]}, "settings": {"frames": 9, "guidance": 1.0}},
    "video-kv4-after": {"task": "t2v", "flow": {**VIDEO_FLOW, "img_size": 14, "top_block_channels": 192},
                        "vae": {**WAN_SMALL, "decoder_base_dim": 16},
                        "settings": {"frames": 13, "guidance": 2.0, "kv_bits": 4, "jacobi_block_size": 196,
                                     "stream_frames": False}},
}
# Checked by tests/test_memory.py: sizes that none of the calibration cases has, and every way the pipeline runs:
# frames streamed (the default) or not, low memory, a quantized KV cache, an image, a long clip through the window.
GUIDED = {"task": "t2v", "flow": {**VIDEO_FLOW, "img_size": 8, "channels": 192, "top_block_channels": 384},
          "vae": {**WAN_SMALL, "decoder_base_dim": 24}, "settings": {"frames": 9, "guidance": 2.5}}
TEST = {
    "video-streamed": GUIDED,
    "video-not-streamed": {**GUIDED, "settings": {**GUIDED["settings"], "stream_frames": False}},
    "video-low-memory": {**GUIDED, "pipeline": {"low_memory": True}},
    "video-kv8": {**GUIDED, "settings": {**GUIDED["settings"], "kv_bits": 8, "jacobi_block_size": 128,
                                         "stream_frames": False}},
    "image": {"task": "t2i", "flow": {**IMAGE_FLOW, "img_size": 12, "channels": 192, "layers_per_block": [2, 2]},
              "vae": {**SD_SMALL, "block_out_channels": [48, 96, 96], "norm_num_groups": 16},
              "settings": {"guidance": 3.0}},
    "video-long-window": {"task": "t2v",
                          "flow": {**VIDEO_FLOW, "img_size": 6, "local_attn_window": 4, "denoiser_window": 2},
                          "vae": {**WAN_SMALL, "decoder_base_dim": 16},
                          "settings": {"frames": 33, "guidance": 1.5, "context_length": 2}},
}
CASES = {"calibration": CALIBRATION, "test": TEST}


def spec_of(case: dict) -> memory.ModelSpec:
    """The planner's model for a probe case: the case's flow and VAE, the shipped text encoder's config."""
    flow, vae, _ = part_configs(case)
    text = T5Config.from_dict(read_config(hub.default_model() / "text"))
    dtype = case.get("dtype", "float32")
    return memory.ModelSpec("probe", PipelineConfig.for_flow(flow), flow, text, vae,
                            {"flow": dtype, "text": "float32", "vae": dtype})


def request_of(case: dict, backend: str = "cpu") -> memory.Request:
    """The planner's request for a probe case: its settings and its pipeline's (low_memory, q_bits)."""
    return memory.request_from_settings(case["task"], case.get("settings", {}), backend=backend,
                                        **case.get("pipeline", {}))


def measure(case: dict, timeout: float = 120) -> dict:
    """The probe's measurement of ``case`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", json.dumps(case)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def compare(case: dict, measured: dict) -> list[tuple[str, int, int]]:
    """(stage, measured, planned) for every stage the probe measured."""
    plan = memory.plan(spec_of(case), request_of(case))
    rows = []
    for stage in STAGE_ORDER:
        if stage in measured["peaks"]:
            rows.append((stage, measured["peaks"][stage], plan.stage(stage).mlx_peak))
    return rows


CONSTANTS = ("CPU_SCORE_COPIES", "QUANT_SCORE_COPIES", "MLP_COPIES", "CONV_UNFOLD_COPIES", "GRAD_SAVED_WIDTHS",
             "GRAD_SAVED_SCORES")


def planned(case: dict, stage: str, constants: dict) -> int:
    saved = {name: getattr(memory, name) for name in constants}
    try:
        for name, value in constants.items():
            setattr(memory, name, value)
        return memory.plan(spec_of(case), request_of(case)).stage(stage).mlx_peak
    finally:
        for name, value in saved.items():
            setattr(memory, name, value)


def fit_constants(measured: dict[str, dict], cases: dict, rounds: int = 3) -> dict:
    """Least squares on every measured stage's error relative to its transient part (peak - weights, so that the
    weights, which the planner counts exactly, do not hide the terms being fitted): the planner is piecewise
    linear in its constants, so a few Gauss-Newton rounds with unit finite differences converge."""
    import numpy as np

    constants = {name: float(getattr(memory, name)) for name in CONSTANTS}
    rows = [(name, stage) for name in cases for stage in measured[name]["peaks"] if stage in STAGE_ORDER]
    for _ in range(rounds):
        base = np.array([planned(cases[n], st, constants) for n, st in rows], dtype=float)
        got = np.array([measured[n]["peaks"][st] for n, st in rows], dtype=float)
        scale = np.maximum(got - np.array([measured[n]["loaded"] for n, _ in rows], dtype=float), 0.05 * got)
        jacobian = np.zeros((len(rows), len(CONSTANTS)))
        for j, name in enumerate(CONSTANTS):
            bumped = {**constants, name: constants[name] + 1.0}
            jacobian[:, j] = [planned(cases[n], st, bumped) for n, st in rows] - base
        step, *_ = np.linalg.lstsq(jacobian / scale[:, None], (got - base) / scale, rcond=None)
        constants = {name: max(0.0, constants[name] + step[j]) for j, name in enumerate(CONSTANTS)}
    return {name: round(value, 2) for name, value in constants.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", choices=tuple(CASES), default="calibration")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fit", action="store_true", help="fit the CPU constants on these cases and print them")
    args = parser.parse_args(argv)
    results, measurements = {}, {}
    print(f"{'case':<20} {'stage':<8} {'measured MB':>12} {'planned MB':>11} {'planned/measured':>17}")
    for name, case in CASES[args.cases].items():
        measurements[name] = measure(case)
        rows = compare(case, measurements[name])
        results[name] = rows
        for stage, got, want in rows:
            print(f"{name:<20} {stage:<8} {got / 1e6:>12.1f} {want / 1e6:>11.1f} {want / got:>17.3f}")
    if args.fit:
        print("fitted constants (paste into starflow_mlx/memory.py):")
        for name, value in fit_constants(measurements, CASES[args.cases]).items():
            print(f"{name} = {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
