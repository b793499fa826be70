"""Resident and peak memory per stage, eager vs ``low_memory`` (weights loaded per stage and released after it),
on the shipped model and on a larger random-weight pipeline built from it (every part scaled up, float32).

Resident: ``mx.get_active_memory()`` at each ``StageStarted``; peak: ``mx.get_peak_memory()`` over the stage (since
``mx.reset_peak_memory()`` at its start); both above what was in use before the pipeline was loaded. Each run is a
fresh process, so nothing of one run is counted in another.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_low_memory.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

PROMPT = "a red square moving right"
# The larger pipeline: the shipped one's configs with these fields replaced (T5 width = the flow's txt_dim).
LARGER = {
    "text": {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 8, "num_heads": 8},
    "flow": {"img_size": 8, "channels": 256, "top_block_channels": 512, "layers_per_block": [2, 2, 2, 8],
             "txt_dim": 512, "head_dim": 64, "dtype": "float32"},
    "vae": {"base_dim": 48, "decoder_base_dim": 64},
}


def build_larger(root: Path) -> Path:
    """The shipped pipeline folder with the ``LARGER`` configs and random float32 weights of their shapes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from starflow_mlx import hub
    from starflow_mlx.config import FlowConfig
    from starflow_mlx.flow import StarFlow
    from starflow_mlx.t5 import T5Config, T5Encoder
    from starflow_mlx.wan_vae import WanVAE, WanVAEConfig

    folder = root / "larger"
    shutil.copytree(hub.default_model(), folder)
    builders = {"text": (T5Config, T5Encoder), "flow": (FlowConfig, StarFlow), "vae": (WanVAEConfig, WanVAE)}
    mx.random.seed(0)
    for part, (config_class, build) in builders.items():
        path = folder / part / "config.json"
        raw = {**json.loads(path.read_text()), **LARGER[part], "dtype": "float32"}
        raw.pop("quantization", None)
        path.write_text(json.dumps(raw, indent=2))
        model = build(config_class.from_dict(raw))
        for name in list((folder / part).glob("model*")):
            name.unlink()
        mx.save_safetensors(str(folder / part / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
    return folder


def measure(folder: str | None, low_memory: bool, settings: dict) -> dict:
    """One generation in this process: {stage: [resident, peak]} and the parts' bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from starflow_mlx.pipeline import Pipeline, StageFinished, StageStarted

    base = mx.get_active_memory()
    pipeline = Pipeline.from_pretrained(folder, low_memory=low_memory)
    stages: dict[str, list[int]] = {}

    def progress(event):
        if isinstance(event, StageStarted):
            mx.clear_cache()
            stages[event.stage] = [mx.get_active_memory() - base]
            mx.reset_peak_memory()
        elif isinstance(event, StageFinished):
            stages[event.stage].append(mx.get_peak_memory() - base)

    pipeline.text_to_video(PROMPT, progress=progress, **settings)
    pipeline.low_memory = False
    parts = {name: sum(v.nbytes for _, v in tree_flatten(getattr(pipeline, attribute).parameters()))
             for name, attribute in (("text", "text_encoder"), ("flow", "flow"), ("vae", "vae"))}
    return {"stages": stages, "parts": parts}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        folder, low_memory, settings = json.loads(args.child)
        print(json.dumps(measure(folder, low_memory, settings)))
        return

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_low_memory_") as tmp:
        models = {"shipped": (None, {}), "larger": (str(build_larger(Path(tmp))), {"jacobi": False, "frames": 9})}
        for model, (folder, settings) in models.items():
            for low_memory in (False, True):
                child = json.dumps([folder, low_memory, settings])
                out = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True,
                                     check=True, cwd=REPO)
                runs[model, low_memory] = json.loads(out.stdout.splitlines()[-1])

    mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    for model in ("shipped", "larger"):
        parts = runs[model, False]["parts"]
        print(f"\n{model}: weights " + ", ".join(f"{k} {mib(v)} MiB" for k, v in parts.items()))
        print("| stage | resident eager (MiB) | resident low_memory | peak eager | peak low_memory |")
        print("|---|---|---|---|---|")
        for stage, (resident, peak) in runs[model, False]["stages"].items():
            low_resident, low_peak = runs[model, True]["stages"][stage]
            print(f"| {stage} | {mib(resident)} | {mib(low_resident)} | {mib(peak)} | {mib(low_peak)} |")


if __name__ == "__main__":
    main()
