"""8/4-bit quantized and bf16/fp16 flows load and run; how far they move NLL and samples from float32.

Bounds are about 3x what was measured on this random-weight model (see BENCHMARKS.md): they catch a broken
quantization path (wrong layer, wrong scales) without claiming quality, which needs trained weights.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from starflow_mlx.convert.flow import convert_flow
from starflow_mlx.flow import load_flow
from starflow_mlx.sampler import SamplerOptions

GUIDED = SamplerOptions(guidance=3.0)


@pytest.fixture(scope="module")
def baseline(tiny_video):
    config, ckpt, yaml_path, folder = tiny_video.config, tiny_video.checkpoint, tiny_video.yaml, tiny_video.folder
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 3, 6, 4, 4)).astype(np.float32))
    y = mx.array(rng.standard_normal((2, config.txt_size, config.txt_dim)).astype(np.float32))
    y_null = mx.array(rng.standard_normal((1, config.txt_size, config.txt_dim)).astype(np.float32))
    model = load_flow(folder)
    return ckpt, yaml_path, x, y, y_null, model.nll(x, y), model.reverse(x[:1], y[:1], y_null, GUIDED)


@pytest.mark.parametrize("bits, nll_bound, sample_rms_bound", [(8, 0.05, 0.1), (4, 0.8, 2.0)])
def test_quantized_flow_loads_and_runs(baseline, tmp_path, bits, nll_bound, sample_rms_bound):
    ckpt, yaml_path, x, y, y_null, nll32, sample32 = baseline
    folder = convert_flow(ckpt, yaml_path, tmp_path / f"q{bits}", q_bits=bits, q_group_size=32)
    assert json.loads((folder / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": bits}
    model = load_flow(folder)
    top = model.blocks[-1]
    assert isinstance(top.layers[0].attention.qkv, nn.QuantizedLinear) and top.layers[0].attention.qkv.bits == bits
    assert isinstance(top.layers[0].mlp.fc2, nn.QuantizedLinear)
    assert type(top.proj_in) is nn.Linear and type(top.proj_out) is nn.Linear  # kept in full precision
    nll = model.nll(x, y)
    sample = model.reverse(x[:1], y[:1], y_null, GUIDED)
    assert bool(mx.all(mx.isfinite(sample)))
    d_nll = float(mx.abs(nll - nll32).max())
    rms = float(mx.sqrt(mx.mean(mx.square(sample - sample32))))
    assert 0 < d_nll < nll_bound
    assert 0 < rms < sample_rms_bound


@pytest.mark.parametrize("dtype, bound", [("bfloat16", 0.07), ("float16", 0.01)])
def test_half_precision_flow(baseline, tmp_path, dtype, bound):
    ckpt, yaml_path, x, y, y_null, nll32, sample32 = baseline
    model = load_flow(convert_flow(ckpt, yaml_path, tmp_path / dtype, dtype=dtype))
    assert model.blocks[0].proj_in.weight.dtype == getattr(mx, dtype)
    out = model(x, y)
    assert out.logdets[-1].dtype == mx.float32  # the affine step always runs in float32
    assert 0 < float(mx.abs(out.nll() - nll32).max()) < bound
    assert bool(mx.all(mx.isfinite(model.reverse(x[:1], y[:1], y_null, GUIDED))))


def test_cast_at_load(baseline, tiny_video):
    _, _, x, y, _, nll32, _ = baseline
    model = load_flow(tiny_video.folder, dtype=mx.float16)
    assert model.blocks[-1].layers[0].attention.qkv.weight.dtype == mx.float16
    assert float(mx.abs(model.nll(x, y) - nll32).max()) < 0.01
