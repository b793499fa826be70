"""Tiny T2V-shaped flow (temporal_causal 2, shallow_block_local, wider deep block, learnable denoiser entry):
MLX vs our PyTorch reference on forward, NLL, the sequential inverse with guidance, and the round trip."""

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.flow import load_flow
from starflow_mlx.sampler import SamplerOptions
from tests.helpers import maxerr

torch = pytest.importorskip("torch")

TOL = 1e-4
B, T = 2, 3


@pytest.fixture(scope="module")
def setup(tiny_video):
    ref, config, folder = tiny_video.reference, tiny_video.config, tiny_video.folder
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, config.in_channels, config.img_size, config.img_size)).astype(np.float32)
    y = rng.standard_normal((B, config.txt_size, config.txt_dim)).astype(np.float32)
    y_null = rng.standard_normal((1, config.txt_size, config.txt_dim)).astype(np.float32)
    return load_flow(folder), ref, config, x, y, y_null


def test_structure_matches_t2v_shape(setup):
    model, _, config, *_ = setup
    assert config.top_channels != config.channels and config.shallow_block_local and config.temporal_causal == 2
    assert model.blocks[-1].proj_in.weight.shape == (96, 6) and model.blocks[0].proj_in.weight.shape == (64, 6)
    assert [b.permutation for b in model.blocks] == ["flip", "identity"] * 3
    assert model.denoiser.proj_out.weight.shape == (6, 64)


def test_forward_and_nll_match_reference(setup):
    model, ref, _, x, y, _ = setup
    out = model(mx.array(x), mx.array(y))
    with torch.no_grad():
        ref_out = ref(torch.from_numpy(x), torch.from_numpy(y))
    assert out.z.shape == x.shape
    assert maxerr(out.z, ref_out.z) <= TOL
    for ours, theirs in zip(out.logdets, ref_out.logdets):
        assert ours.shape == tuple(theirs.shape)
        assert maxerr(ours, theirs) <= TOL
    assert maxerr(out.nll(), ref_out.nll()) <= TOL
    assert maxerr(out.bits_per_dim(), out.nll() / np.log(2)) <= 1e-6
    # the blocks are far from the identity, so the comparison means something
    assert maxerr(out.z, x) > 0.5
    assert all(float(mx.abs(l).max()) > 0.05 for l in out.logdets)


def test_shallow_blocks_are_local_per_frame(setup):
    """Changing frame 2 leaves the shallow outputs of frames 0-1 untouched; the deep block is causal over time."""
    model, _, _, x, y, _ = setup
    x2 = x.copy()
    x2[:, 2] += 1.0
    a, b = model(mx.array(x), mx.array(y)), model(mx.array(x2), mx.array(y))
    assert maxerr(a.outputs[5][:, :2], b.outputs[5][:, :2]) == 0.0
    assert maxerr(a.z[:, :2], b.z[:, :2]) <= 1e-6  # causal in time
    assert maxerr(a.z[:, 2], b.z[:, 2]) > 0.1


def test_sequential_inverse_with_guidance_matches_reference(setup):
    model, ref, _, x, y, y_null = setup
    z = x[:1]
    guided = SamplerOptions(guidance=3.0)
    ours = model.reverse(mx.array(z), mx.array(y[:1]), mx.array(y_null), guided)
    theirs = ref.reverse(torch.from_numpy(z), torch.from_numpy(y[:1]), torch.from_numpy(y_null), guided)
    assert maxerr(ours, theirs) <= TOL
    plain = model.reverse(mx.array(z), mx.array(y[:1]))
    assert maxerr(plain, ours) > 1e-2


def test_inverse_of_forward_is_identity(setup):
    model, _, _, x, y, _ = setup
    z = model(mx.array(x), mx.array(y)).z
    assert maxerr(model.reverse(z, mx.array(y)), x) <= TOL


def test_image_input_on_video_model(setup):
    """Images (B, C, H, W) go through the same flow as one-frame videos."""
    model, ref, _, x, y, _ = setup
    img = x[:, 0]
    out = model(mx.array(img), mx.array(y))
    assert out.z.shape == img.shape
    with torch.no_grad():
        assert maxerr(out.z, ref(torch.from_numpy(img), torch.from_numpy(y)).z) <= TOL
    assert maxerr(model(mx.array(img[:, None]), mx.array(y)).z[:, 0], out.z) <= 1e-6


def test_denoiser_forward_matches_reference(setup):
    model, ref, _, x, y, _ = setup
    h = model.patchify(mx.array(x))
    ours = model.denoiser(h, mx.array(y), video=True)
    with torch.no_grad():
        theirs = ref.learnable_self_denoiser(ref.patchify(torch.from_numpy(x)), torch.from_numpy(y), True)
    assert maxerr(ours, theirs) <= TOL
    assert float(mx.abs(ours).max()) > 0.05
