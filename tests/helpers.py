"""Helpers shared by the tests: error measures, array conversion, and the official fixtures by name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFLOW_SHARED", REPO.parent / "shared"))


def maxerr(a, b) -> float:
    """Largest absolute difference, computed in float64 (MLX, torch and numpy arrays alike)."""
    return float(np.abs(to_numpy(a) - to_numpy(b)).max())


def to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def to_torch(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


@dataclass(frozen=True)
class OfficialFixture:
    """Numbers computed by Apple's implementation (``../shared/fixtures/<name>``): its README says what each is."""

    name: str
    root: Path
    io: dict

    @property
    def checkpoint(self) -> Path:
        return self.root / "model.pth"

    @property
    def yaml(self) -> Path:
        return self.root / "config.yaml"


def official_fixture(name: str) -> OfficialFixture:
    """Load an official fixture; skipped when ``../shared`` is absent, except under CI (``CI`` set), where a
    missing fixture is a failure: the parity tests must never be skipped silently there."""
    root = SHARED / "fixtures" / name
    if not root.is_dir():
        message = f"official fixture {name!r} not found at {root} (set STARFLOW_SHARED)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    return OfficialFixture(name, root, dict(np.load(root / "io.npz")))
