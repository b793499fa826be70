"""Our converter + MLX flow, and our PyTorch reference, reproduce numbers computed by the official code."""

import mlx.core as mx
import numpy as np
import pytest

from convert.flow import convert_flow
from starflow_mlx.flow import load_flow
from tests.conftest import official_fixture

TOL = 1e-4


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = official_fixture()
    folder = convert_flow(root / "model.pth", root / "config.yaml", tmp_path_factory.mktemp("t2i") / "mlx")
    return load_flow(folder), dict(np.load(root / "io.npz")), root


def maxerr(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_mlx_forward_matches_official(official):
    model, io, _ = official
    out = model(mx.array(io["x"]), mx.array(io["y"]))
    assert out.z.shape == io["z"].shape
    assert maxerr(out.z, io["z"]) <= TOL
    for i, logdet in enumerate(out.logdets):
        assert maxerr(logdet.reshape(io[f"logdet_{i}"].shape), io[f"logdet_{i}"]) <= TOL
    for i, h in enumerate(out.outputs):
        assert maxerr(h[:, 0], io[f"output_{i}"]) <= TOL  # image = one-frame video inside the model
    assert maxerr(out.loss().mean(), io["loss"]) <= TOL
    # every block does real work (the fixture's weights are not the identity init)
    assert maxerr(io["output_1"], io["output_0"]) > 0.1


def test_mlx_sequential_samples_match_official(official):
    model, io, _ = official
    noise, y = mx.array(io["noise"]), mx.array(io["y"][:1])
    assert maxerr(model.reverse(noise, y), io["sample_nocfg"]) <= TOL
    cfg = model.reverse(noise, y, guidance=2.5, text_null=mx.array(io["y_null"]))
    assert maxerr(cfg, io["sample_cfg"]) <= TOL
    assert maxerr(io["sample_cfg"], io["sample_nocfg"]) > 1e-2  # guidance changes the sample


def test_reference_matches_official(official):
    torch = pytest.importorskip("torch")
    from starflow_mlx.config import load_official_yaml
    from tests.reference import StarFlow, load_official_state_dict

    _, io, root = official
    ref = StarFlow(load_official_yaml(root / "config.yaml")).eval()
    load_official_state_dict(ref, torch.load(root / "model.pth", weights_only=True))
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    with torch.no_grad():
        out = ref(t["x"], t["y"])
    assert maxerr(out.z, io["z"]) <= TOL
    for i, logdet in enumerate(out.logdets):
        assert maxerr(logdet.reshape(io[f"logdet_{i}"].shape), io[f"logdet_{i}"]) <= TOL
    for i, h in enumerate(out.outputs):
        assert maxerr(h[:, 0], io[f"output_{i}"]) <= TOL
    assert maxerr(out.loss().mean(), io["loss"]) <= TOL
    assert maxerr(ref.reverse(t["noise"], t["y"][:1]), io["sample_nocfg"]) <= TOL
    assert maxerr(ref.reverse(t["noise"], t["y"][:1], 2.5, t["y_null"]), io["sample_cfg"]) <= TOL
