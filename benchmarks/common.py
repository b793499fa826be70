"""Shared by the benchmarks: build a random-weight official-format checkpoint for a YAML config."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def make_checkpoint(workdir: Path, yaml_text: str, seed: int = 0) -> tuple[Path, Path]:
    """Reference model with random non-trivial weights, saved as an official .pth next to its YAML."""
    import torch

    from starflow_mlx.config import load_official_yaml
    from tests.conftest import official_state_dict, randomize_
    from tests.reference import StarFlow

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml_text)
    config = load_official_yaml(workdir / "config.yaml")
    model = StarFlow(config)
    randomize_(model, seed=seed)
    torch.save(official_state_dict(model, config), workdir / "model.pth")
    return workdir / "model.pth", workdir / "config.yaml"


def mlx_model(workdir: Path):
    from starflow_mlx.convert.flow import convert_flow
    from starflow_mlx.flow import load_flow

    folder = workdir / "mlx"
    if not folder.exists():
        convert_flow(workdir / "model.pth", workdir / "config.yaml", folder)
    return load_flow(folder)


def timed(fn, repeats: int = 1, warmup: bool = True) -> float:
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats
