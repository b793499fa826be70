"""Our converter + MLX flow, and our PyTorch reference, reproduce numbers computed by Apple's implementation.

Two official fixtures: ``official-t2i-tiny`` (text-to-image: forward, sequential and Jacobi samples with and
without guidance) and ``official-t2v-window`` (global-local video: forward, Jacobi with guidance and the deep
block's sliding window taken from the model's ``local_attn_window``, a 2-frame prefix, the learnable denoiser).
Every number is checked on both implementations within 1e-4.
"""

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.config import load_official_yaml
from starflow_mlx.convert.flow import convert_flow
from starflow_mlx.flow import load_flow
from starflow_mlx.sampler import Jacobi, SamplerOptions, SamplerStats, stream_sample
from tests.helpers import maxerr, official_fixture, to_torch

torch = pytest.importorskip("torch")

TOL = 1e-4
# The official Jacobi settings of both fixtures' samples.
OFFICIAL_JACOBI = Jacobi(block_size=4, threshold=1e-9, max_iter=200)


class Implementation:
    """One implementation (MLX or the torch reference) loaded with one fixture's weights, behind one interface."""

    def __init__(self, kind: str, fixture, tmp_path_factory):
        self.kind = kind
        if kind == "mlx":
            folder = convert_flow(fixture.checkpoint, fixture.yaml, tmp_path_factory.mktemp(fixture.name) / "mlx")
            self.model = load_flow(folder)
            self.array = mx.array
        else:
            from tests.reference import StarFlow, load_official_state_dict

            self.model = StarFlow(load_official_yaml(fixture.yaml)).eval()
            load_official_state_dict(self.model, torch.load(fixture.checkpoint, weights_only=True))
            self.array = to_torch

    def forward(self, x, y):
        if self.kind == "mlx":
            return self.model(self.array(x), self.array(y))
        with torch.no_grad():
            return self.model(self.array(x), self.array(y))

    def reverse(self, noise, y, y_null=None, options=SamplerOptions(), prefix=None):
        y_null = None if y_null is None else self.array(y_null)
        return self.model.reverse(self.array(noise), self.array(y), y_null, options, prefix)

    def prefill(self, x, y, guidance, y_null, frames):
        return self.model.prefill(self.array(x), self.array(y), guidance, self.array(y_null), frames=frames)

    def denoiser_prediction(self, x, y):
        if self.kind == "mlx":
            return self.model.predict_noise(self.array(x), self.array(y), video=True)
        with torch.no_grad():
            return self.model.predict_noise(self.array(x), self.array(y), True)


@pytest.fixture(scope="module")
def t2i():
    return official_fixture("official-t2i-tiny")


@pytest.fixture(scope="module")
def t2v():
    return official_fixture("official-t2v-window")


@pytest.fixture(scope="module", params=["mlx", "reference"])
def t2i_model(request, t2i, tmp_path_factory):
    return Implementation(request.param, t2i, tmp_path_factory)


@pytest.fixture(scope="module", params=["mlx", "reference"])
def t2v_model(request, t2v, tmp_path_factory):
    return Implementation(request.param, t2v, tmp_path_factory)


def check_forward(out, io, blocks: int, video: bool):
    assert tuple(out.z.shape) == io["z"].shape
    assert maxerr(out.z, io["z"]) <= TOL
    for i in range(blocks):
        expected = io[f"logdet_{i}"]
        assert maxerr(out.logdets[i].reshape(expected.shape), expected) <= TOL
    for i, h in enumerate(out.outputs):
        assert maxerr(h if video else h[:, 0], io[f"output_{i}"]) <= TOL  # image = one-frame video inside
    assert maxerr(out.loss().mean(), io["loss"]) <= TOL
    # every block does real work (the fixtures' weights are not the identity init)
    assert maxerr(io["output_1"], io["output_0"]) > 0.1


# ---- text-to-image ----


def test_t2i_forward(t2i_model, t2i):
    check_forward(t2i_model.forward(t2i.io["x"], t2i.io["y"]), t2i.io, blocks=3, video=False)


def test_t2i_sequential_samples(t2i_model, t2i):
    io = t2i.io
    assert maxerr(t2i_model.reverse(io["noise"], io["y"][:1]), io["sample_nocfg"]) <= TOL
    guided = t2i_model.reverse(io["noise"], io["y"][:1], io["y_null"], SamplerOptions(guidance=2.5))
    assert maxerr(guided, io["sample_cfg"]) <= TOL
    assert maxerr(io["sample_cfg"], io["sample_nocfg"]) > 1e-2  # guidance changes the sample


def test_t2i_jacobi_sample(t2i_model, t2i):
    io = t2i.io
    options = SamplerOptions(guidance=2.5, solver=OFFICIAL_JACOBI)
    assert maxerr(t2i_model.reverse(io["noise"], io["y"][:1], io["y_null"], options), io["sample_jacobi_cfg"]) <= TOL


# ---- text-to-video: global-local blocks, sliding window, prefix, denoiser ----


def test_t2v_fixture_exercises_the_window(t2v):
    config = load_official_yaml(t2v.yaml)
    assert config.local_attn_window == 3 and config.shallow_block_local and config.temporal_causal == 2
    assert t2v.io["noise"].shape[1] == 5  # 5 frames through a 3-frame window: the window moves twice


def test_t2v_forward(t2v_model, t2v):
    check_forward(t2v_model.forward(t2v.io["x"], t2v.io["y"]), t2v.io, blocks=5, video=True)


def test_t2v_jacobi_sliding_window_sample(t2v_model, t2v):
    """The window (3 frames) comes from the model's local_attn_window; the official overlap is 2 frames."""
    io = t2v.io
    options = SamplerOptions(guidance=3.0, solver=OFFICIAL_JACOBI, overlap=2)
    assert maxerr(t2v_model.reverse(io["noise"], io["y"][:1], io["y_null"], options), io["sample_jacobi_cfg"]) <= TOL


def test_t2v_two_frame_prefix_sample(t2v_model, t2v):
    io = t2v.io
    prefix = t2v_model.prefill(io["i2v_first_frame"], io["y"][:1], 3.0, io["y_null"], frames=5)
    options = SamplerOptions(guidance=3.0, solver=OFFICIAL_JACOBI, overlap=2)
    out = t2v_model.reverse(io["noise"], io["y"][:1], io["y_null"], options, prefix)
    assert maxerr(out, io["sample_i2v_jacobi_cfg"]) <= TOL
    assert maxerr(out[:, :2], io["i2v_first_frame"]) <= TOL  # the given frames come back out
    assert maxerr(io["sample_i2v_jacobi_cfg"], io["sample_jacobi_cfg"]) > 1e-2  # the prefix changes the sample


def test_t2v_denoiser_prediction(t2v_model, t2v):
    io = t2v.io
    assert maxerr(t2v_model.denoiser_prediction(io["denoised_input"], io["y"][:1]), io["denoiser_out"]) <= TOL
    assert float(np.abs(io["denoiser_out"]).max()) > 0.05


def test_t2v_events_while_sampling(t2v, tmp_path_factory):
    """The MLX sampler reports the official window schedule as events, ending with the same sample."""
    t2v_model = Implementation("mlx", t2v, tmp_path_factory)
    io = t2v.io
    options = SamplerOptions(guidance=3.0, solver=OFFICIAL_JACOBI, overlap=2)
    events = list(stream_sample(t2v_model.model, mx.array(io["noise"]), mx.array(io["y"][:1]),
                                mx.array(io["y_null"]), options))
    moves = [e for e in events if type(e).__name__ == "WindowMoved"]
    assert [(m.first_frame, m.overlap) for m in moves] == [(1, 2), (2, 2)]  # 5 frames, window 3, overlap 2
    frames = [e for e in events if type(e).__name__ == "FrameSampled"]
    assert [f.index for f in frames] == list(range(5))
    final = events[-1]
    assert type(final).__name__ == "Sampled" and isinstance(final.stats, SamplerStats)
    assert final.stats.deep.reencodes == 2
    assert maxerr(final.latent, io["sample_jacobi_cfg"]) <= TOL
