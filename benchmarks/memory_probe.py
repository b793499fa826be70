"""Measure the peak memory of one generation, stage by stage, on a scaled random-weight pipeline.

Run as ``python -m benchmarks.memory_probe '<json case>'`` in a fresh process (nothing else resident), it prints
one JSON object: the bytes active after loading (``loaded``) and the peak of each stage (``mx.reset_peak_memory``
at ``StageStarted``, ``mx.get_peak_memory`` at ``StageFinished``; ``sample`` ends at the sampler's ``Sampled``,
and ``score`` is the rest of the pipeline's sample stage, the record's scoring forward; ``decode`` is left out when
every frame was decoded inside the sample stage). ``tests/test_memory.py`` and ``benchmarks/calibrate_memory.py``
compare them with ``starflow_mlx.memory``'s plan of the same case.

A case: ``{"flow": {FlowConfig fields}, "vae": {WanVAEConfig or SDVAEConfig fields}, "task": "t2v"|"t2i",
"dtype": "float32"|..., "settings": {Settings fields}, "pipeline": {from_pretrained arguments: low_memory,
q_bits}}``; the text encoder and tokenizer are the shipped model's (64-wide), so ``flow.txt_dim`` is 64 and the
flow's ``in_channels`` the VAE's latent channels.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from starflow_mlx import hub  # noqa: E402
from starflow_mlx.config import FlowConfig, PipelineConfig  # noqa: E402
from starflow_mlx.weights import write_model_folder  # noqa: E402

TEXT_WIDTH = 64  # the shipped model's T5


def part_configs(case: dict):
    """(FlowConfig, VAE config, vae kind) of a case."""
    from starflow_mlx.sd_vae import SDVAEConfig
    from starflow_mlx.wan_vae import WanVAEConfig

    flow = FlowConfig(**{"txt_dim": TEXT_WIDTH, **case["flow"]})
    if case["task"] == "t2v":
        return flow, WanVAEConfig(**case.get("vae", {})), "wan-vae"
    return flow, SDVAEConfig(**case.get("vae", {})), "sd-vae"


def write_part(folder: Path, config, model, dtype: str) -> None:
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    write_model_folder(folder, {**config.to_dict(), "dtype": dtype}, weights)


def build_folder(case: dict, root: Path) -> Path:
    """A pipeline folder: the shipped text encoder, a random-weight flow and VAE of the case's configs."""
    from starflow_mlx.flow import StarFlow
    from starflow_mlx.sd_vae import SDVAE
    from starflow_mlx.wan_vae import WanVAE

    flow_config, vae_config, kind = part_configs(case)
    dtype = case.get("dtype", "float32")
    folder = root / "pipeline"
    folder.mkdir()
    shutil.copytree(hub.default_model() / "text", folder / "text")
    mx.random.seed(1)
    write_part(folder / "flow", flow_config, StarFlow(flow_config), dtype)
    mx.random.seed(2)
    write_part(folder / "vae", vae_config, (WanVAE if kind == "wan-vae" else SDVAE)(vae_config), dtype)
    pipeline = PipelineConfig.for_flow(flow_config)
    (folder / "config.json").write_text(json.dumps(pipeline.to_dict()))
    return folder


def measure(case: dict) -> dict:
    from starflow_mlx.pipeline import Pipeline, StageFinished, StageStarted
    from starflow_mlx.sampler import Sampled

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(case, Path(tmp))
        mx.clear_cache()
        mx.reset_peak_memory()
        pipeline = Pipeline.from_pretrained(folder, **case.get("pipeline", {}))
        loaded = mx.get_active_memory()
        peaks = {"load": mx.get_peak_memory()}
        task = case["task"]
        for event in pipeline.stream("a red square moving right", task=task, **case.get("settings", {})):
            if isinstance(event, StageStarted):
                mx.reset_peak_memory()
            elif isinstance(event, Sampled):  # the rest of the sample stage is the record's scoring forward
                peaks["sample"] = mx.get_peak_memory()
                mx.reset_peak_memory()
            elif isinstance(event, StageFinished):
                peaks["score" if event.stage == "sample" else event.stage] = mx.get_peak_memory()
        if not peaks.get("decode"):  # every frame was decoded while sampling: nothing left to decode
            peaks.pop("decode", None)
        return {"loaded": loaded, "peaks": peaks, "folder_free": True}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
