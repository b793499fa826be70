"""The LatentCodec contract (starflow_mlx.codec), one parametrised test for both VAEs on tiny random models.

Parity of each VAE with its PyTorch reference is in test_wan_vae.py / test_sd_vae.py; here only what the flow and
the pipeline rely on: the same members, shapes, layouts, noise semantics and dtypes on both.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from starflow_mlx.codec import DecodeStream, LatentCodec
from starflow_mlx.sd_vae import SDVAE, SDVAEConfig
from starflow_mlx.wan_vae import WanVAE, WanVAEConfig
from starflow_mlx.weights import compute_dtype

H, W = 32, 48


def _wan():
    mx.random.seed(0)
    return WanVAE(WanVAEConfig(base_dim=16, decoder_base_dim=24))


def _sd():
    mx.random.seed(0)
    return SDVAE(SDVAEConfig(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4))


def _wan_flow_mean(vae, mu):
    """STARFlow's Wan latent at ε = 0, from Wan's posterior mean (B, T', C, h, w), in numpy."""
    cfg = vae.config
    z = (np.array(mu) - np.array(cfg.latents_mean)[:, None, None]) / np.array(cfg.latents_std)[:, None, None]
    if z.ndim == 5:
        z[:, 1:] *= cfg.temporal_scale
    return z


def _sd_flow_mean(vae, mean):
    return np.array(mean) * vae.config.scaling_factor


# name -> (model factory, pixel frame counts, latent channels, spatial factor, temporal factor, flow mean)
CODECS = {
    "wan": (_wan, [1, 5, 9], 48, 16, 4, _wan_flow_mean),
    "sd": (_sd, [1, 3], 4, 8, 1, _sd_flow_mean),
}


@pytest.fixture(scope="module", params=list(CODECS))
def codec(request):
    make, frames, channels, spatial, temporal, flow_mean = CODECS[request.param]
    return dict(vae=make(), frames=frames, channels=channels, spatial=spatial, temporal=temporal,
                flow_mean=flow_mean)


def _pixels(batch, frames, seed=0):
    shape = (batch, 3, H, W) if frames is None else (batch, frames, 3, H, W)
    return mx.random.uniform(-1, 1, shape, key=mx.random.key(seed))


def test_members(codec):
    vae = codec["vae"]
    assert isinstance(vae, LatentCodec)
    assert isinstance(vae.decode_stream(), DecodeStream)
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (
        codec["channels"], codec["spatial"], codec["temporal"])
    t = codec["temporal"]
    assert [vae.frames_for(k) for k in range(4)] == [0, 1, 1 + t, 1 + 2 * t]
    with pytest.raises(ValueError, match="latent_frames"):
        vae.frames_for(-1)


def test_shapes_stream_and_round_trip(codec):
    vae, C, f = codec["vae"], codec["channels"], codec["spatial"]
    for frames in codec["frames"]:
        x = _pixels(2, frames, seed=frames)
        z = vae.to_flow_latent(x, key=mx.random.key(1))
        latent_frames = 1 + (frames - 1) // codec["temporal"]
        assert z.shape == (2, latent_frames, C, H // f, W // f) and z.dtype == mx.float32, frames
        assert vae.frames_for(latent_frames) == frames
        whole = vae.from_flow_latent(z)
        assert whole.shape == x.shape and whole.dtype == mx.float32, frames
        # one latent frame at a time: the first gives 1 frame, later ones temporal_factor; together the clip
        stream = vae.decode_stream()
        chunks = [stream.push(z[:, i]) for i in range(latent_frames)]
        assert [c.shape for c in chunks] == [(2, 1 if i == 0 else codec["temporal"], 3, H, W)
                                             for i in range(latent_frames)]
        assert all(c.dtype == mx.float32 for c in chunks)
        got = mx.concatenate(chunks, axis=1)
        assert float(mx.abs(got - whole).max()) <= 1e-5 * float(mx.abs(whole).max()), frames
    # images: 4-D in, 4-D out
    image = _pixels(2, None)
    zi = vae.to_flow_latent(image, noise=mx.zeros((2, C, H // f, W // f)))
    assert zi.shape == (2, C, H // f, W // f) and zi.dtype == mx.float32
    assert vae.from_flow_latent(zi).shape == image.shape
    # a one-frame video and an image are the same thing
    assert mx.allclose(vae.to_flow_latent(image[:, None], noise=mx.zeros((2, 1, C, H // f, W // f)))[:, 0], zi,
                       atol=1e-6)


def test_noise(codec):
    vae, flow_mean = codec["vae"], codec["flow_mean"]
    x = _pixels(1, codec["frames"][-1], seed=3)
    mean, logvar = vae.encode(x)
    assert mean.dtype == logvar.dtype == mx.float32
    assert float(logvar.min()) >= -30 and float(logvar.max()) <= 20
    zero = vae.to_flow_latent(x, noise=mx.zeros(mean.shape))
    want = flow_mean(vae, mean)
    assert np.abs(np.array(zero) - want).max() <= 1e-5 * np.abs(want).max()  # ε = 0: the posterior mean
    a = vae.to_flow_latent(x, key=mx.random.key(5))
    assert mx.array_equal(a, vae.to_flow_latent(x, key=mx.random.key(5)))
    assert not mx.allclose(a, zero, atol=1e-3) and not mx.allclose(a, vae.to_flow_latent(x, key=mx.random.key(6)))
    # ε enters linearly: z(2ε) - z(0) = 2 (z(ε) - z(0))
    eps = mx.random.normal(mean.shape, key=mx.random.key(7))
    one, two = vae.to_flow_latent(x, noise=eps), vae.to_flow_latent(x, noise=2 * eps)
    assert mx.allclose(two - zero, 2 * (one - zero), atol=1e-4)
    with pytest.raises(ValueError, match="noise has shape"):
        vae.to_flow_latent(x, noise=mx.zeros(mean.shape[1:]))


def test_channels_last_is_the_transpose(codec):
    vae = codec["vae"]
    x = _pixels(1, codec["frames"][-1], seed=4)
    x_cl = x.transpose(0, 1, 3, 4, 2)
    eps = mx.random.normal(vae.encode(x)[0].shape, key=mx.random.key(8))
    z = vae.to_flow_latent(x, noise=eps)
    z_cl = vae.to_flow_latent(x_cl, noise=eps.transpose(0, 1, 3, 4, 2), channels_last=True)
    assert mx.allclose(z_cl, z.transpose(0, 1, 3, 4, 2), atol=1e-5)
    pixels = vae.from_flow_latent(z)
    pixels_cl = vae.from_flow_latent(z_cl, channels_last=True)
    assert mx.allclose(pixels_cl, pixels.transpose(0, 1, 3, 4, 2), atol=1e-5)
    first = vae.decode_stream(channels_last=True).push(z_cl[:, 0])
    assert mx.allclose(first, pixels_cl[:, :1], atol=1e-5)
    mean_cl, _ = vae.encode(x_cl, channels_last=True)
    assert mx.allclose(mean_cl, vae.encode(x)[0].transpose(0, 1, 3, 4, 2), atol=1e-5)


def test_dtype_policy(codec):
    """bfloat16 weights: the codec computes in bfloat16 (not float32 with bf16 weights) and returns float32."""
    vae = codec["vae"]
    half = type(vae)(vae.config)
    half.update(tree_map(lambda p: p.astype(mx.bfloat16), vae.parameters()))
    rounded = type(vae)(vae.config)  # float32 compute on the same bf16-rounded weights
    rounded.update(tree_map(lambda p: p.astype(mx.bfloat16).astype(mx.float32), vae.parameters()))
    assert compute_dtype(half) == mx.bfloat16 and compute_dtype(rounded) == mx.float32
    x = _pixels(1, codec["frames"][-1], seed=5)
    z = rounded.to_flow_latent(x, noise=mx.zeros(rounded.encode(x)[0].shape))
    for name, run in (("to_flow_latent", lambda v: v.to_flow_latent(x, noise=mx.zeros(z.shape))),
                      ("from_flow_latent", lambda v: v.from_flow_latent(z)),
                      ("decode_stream", lambda v: v.decode_stream().push(z[:, 0]))):
        got, want = run(half), run(rounded)
        assert got.dtype == want.dtype == mx.float32, name
        err = float(mx.abs(got - want).max() / mx.abs(want).max())
        assert 0 < err < 0.1, (name, err)
