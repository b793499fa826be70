"""Wan2.2 VAE: converters (original .pth and diffusers layouts) and MLX parity with diffusers' AutoencoderKLWan.

The reference is diffusers' ``AutoencoderKLWan`` configured as Wan2.2 (residual blocks, 2x2 patchify, z_dim 48)
with tiny widths (encoder 16, decoder 24) and random weights, including non-trivial RMS-norm gammas.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import mlx.core as mx  # noqa: E402

from starflow_mlx.convert.wan_vae import convert_wan_vae  # noqa: E402
from starflow_mlx.cli import main as cli_main  # noqa: E402
from starflow_mlx.wan_vae import (  # noqa: E402
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    load_wan_vae,
    original_names,
)
from starflow_mlx.checkpoint import CheckpointError  # noqa: E402
from starflow_mlx.weights import OutputFolderError, compute_dtype, read_config, sha256_file  # noqa: E402

from diffusers import AutoencoderKLWan  # noqa: E402
from tests.conftest import diffusers_wan_decode_unclamped  # noqa: E402

TOL = 1e-4  # max abs error relative to the reference output's max abs value
TS = 0.6


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_starflow(x: "torch.Tensor") -> np.ndarray:
    """torch (B, C, T, H, W) -> STARFlow's (B, T, C, H, W), the WanVAE default layout."""
    return x.permute(0, 2, 1, 3, 4).numpy()


def to_mlx_video(x: "torch.Tensor") -> mx.array:
    return mx.array(to_starflow(x))


def flow_latent(mu: "torch.Tensor") -> mx.array:
    """Wan's raw posterior mean (B, C, T', h, w) -> STARFlow's flow latent (B, T', C, h, w), in float64 numpy."""
    z = (to_starflow(mu).astype(np.float64) - np.array(WAN22_LATENTS_MEAN)[:, None, None]) / np.array(
        WAN22_LATENTS_STD)[:, None, None]
    z[:, 1:] *= TS
    return mx.array(z.astype(np.float32))


def tiny_wan_vae() -> "AutoencoderKLWan":
    """diffusers' AutoencoderKLWan configured as Wan2.2 with tiny widths, random gammas and biases (seed 0)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=16, decoder_base_dim=24, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)  # default ones would hide a missing/misplaced gamma
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return vae


@pytest.fixture(scope="module")
def ref():
    return tiny_wan_vae()


@pytest.fixture(scope="module")
def folders(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    ref.save_pretrained(root / "diffusers")
    original = {original_names(2).to_checkpoint(k): v.clone() for k, v in ref.state_dict().items()}
    torch.save(original, root / "Wan2.2_VAE.pth")
    convert_wan_vae(root / "diffusers", root / "mlx_diffusers")
    convert_wan_vae(root / "Wan2.2_VAE.pth", root / "mlx_wan")
    return root


@pytest.fixture(scope="module")
def model(folders):
    return load_wan_vae(folders / "mlx_wan")


def ref_encode(vae, video):
    with torch.no_grad():
        dist = vae.encode(video).latent_dist
    return dist.mean, dist.logvar


def random_video(frames, h=32, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------------------------------


def test_original_layout_matches_spec_key_pattern(folders):
    from starflow_mlx.checkpoint import read_state_dict

    sd = read_state_dict(folders / "Wan2.2_VAE.pth")
    assert len(sd) == 196
    expected = {
        "encoder.conv1.weight": (16, 12, 3, 3, 3),
        "encoder.downsamples.0.downsamples.2.resample.1.weight": (16, 16, 3, 3),
        "encoder.downsamples.1.downsamples.0.shortcut.weight": (32, 16, 1, 1, 1),
        "encoder.downsamples.2.downsamples.2.time_conv.weight": (64, 64, 3, 1, 1),
        "encoder.downsamples.3.downsamples.1.residual.3.gamma": (64, 1, 1, 1),
        "encoder.middle.1.norm.gamma": (64, 1, 1),
        "encoder.middle.1.to_qkv.weight": (192, 64, 1, 1),
        "encoder.middle.2.residual.6.weight": (64, 64, 3, 3, 3),
        "encoder.head.0.gamma": (64, 1, 1, 1),
        "encoder.head.2.weight": (96, 64, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1),
        "conv2.weight": (48, 48, 1, 1, 1),
        "decoder.conv1.weight": (96, 48, 3, 3, 3),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (192, 96, 3, 1, 1),
        "decoder.upsamples.1.upsamples.3.resample.1.weight": (96, 96, 3, 3),
        "decoder.upsamples.2.upsamples.0.shortcut.weight": (48, 96, 1, 1, 1),
        "decoder.upsamples.3.upsamples.2.residual.0.gamma": (24, 1, 1, 1),
        "decoder.head.2.weight": (12, 24, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("time_conv" in k for k in sd if k.startswith("encoder.downsamples.0."))
    assert not any("time_conv" in k for k in sd if k.startswith("decoder.upsamples.2."))


def test_both_layouts_convert_to_identical_folders(folders):
    from starflow_mlx.weights import read_model_folder

    a, b = read_model_folder(folders / "mlx_diffusers"), read_model_folder(folders / "mlx_wan")
    assert a.keys() == b.keys() and len(a) == 196
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    assert a["encoder.conv_in.weight"].shape == (16, 3, 3, 3, 12)  # [O, kT, kH, kW, I]
    assert a["encoder.mid_block.attention.to_qkv.weight"].shape == (192, 64)


def test_config_json(folders):
    for name, src in (("mlx_wan", "Wan2.2_VAE.pth"), ("mlx_diffusers", "diffusers/diffusion_pytorch_model.safetensors")):
        cfg = read_config(folders / name)
        assert cfg["model_type"] == "wan-vae"
        assert cfg["converter_version"] == "1"
        assert cfg["source"]["files"] == {src.split("/")[-1]: sha256_file(folders / src)}
        assert (cfg["base_dim"], cfg["decoder_base_dim"], cfg["z_dim"]) == (16, 24, 48)
        assert cfg["dim_mult"] == [1, 2, 4, 4] and cfg["temporal_downsample"] == [False, True, True]
        assert cfg["temporal_scale"] == 0.6 and cfg["dtype"] == "float32"
        assert cfg["latents_mean"] == WAN22_LATENTS_MEAN and cfg["latents_std"] == WAN22_LATENTS_STD
    assert WAN22_LATENTS_MEAN[:3] == [-0.2289, -0.0052, -0.1323] and WAN22_LATENTS_STD[-1] == 0.7744


def test_converter_unexpected_key_in_diffusers_folder(folders, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(folders / "diffusers", src)
    sd = safetensors_torch.load_file(src / "diffusion_pytorch_model.safetensors")
    sd["decoder.extra.weight"] = torch.zeros(3)
    sd.pop("decoder.norm_out.gamma")
    safetensors_torch.save_file(sd, src / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)missing key 'decoder\.norm_out\.gamma'.*unexpected key "
                       r"'decoder\.extra\.weight'"):
        convert_wan_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_truncated_safetensors(folders, tmp_path):
    # (a truncated Wan2.2_VAE.pth is one of the cases of test_converters.py)
    src = tmp_path / "d"
    shutil.copytree(folders / "diffusers", src)
    f = src / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        convert_wan_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_converter_refuses_code_pickle_and_diffusers_file(folders, tmp_path):
    from starflow_mlx.checkpoint import UnsafeCheckpointError

    src = tmp_path / "evil.pth"
    torch.save({"encoder.conv1.weight": _RunsCode()}, src)
    with pytest.raises(UnsafeCheckpointError, match="posix.getcwd|os.getcwd"):
        convert_wan_vae(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="diffusers AutoencoderKLWan key names; pass its folder"):
        convert_wan_vae(folders / "diffusers" / "diffusion_pytorch_model.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_rejects_wan21_config_and_existing_output(folders, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(folders / "diffusers", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["is_residual"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is_residual"):
        convert_wan_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputFolderError, match="already exists"):
        convert_wan_vae(folders / "Wan2.2_VAE.pth", folders / "mlx_wan")


def test_cli(folders, tmp_path):
    out = tmp_path / "cli_out"
    assert cli_main(["convert", "wan-vae", str(folders / "Wan2.2_VAE.pth"), str(out), "--dtype", "bfloat16"]) == 0
    cfg = read_config(out)
    assert cfg["dtype"] == "bfloat16" and cfg["source"]["format"] == "wan"
    assert compute_dtype(load_wan_vae(out)) == mx.bfloat16
    assert cli_main(["convert", "wan-vae", str(folders / "Wan2.2_VAE.pth"), str(out)]) == 2  # exists
    assert cli_main(["convert", "wan-vae", str(folders / "nope.pth"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["mlx_wan", "mlx_diffusers"])
def test_encode_decode_parity(ref, folders, source):
    ours = load_wan_vae(folders / source)
    video = random_video(5)
    mu_ref, logvar_ref = ref_encode(ref, video)
    mu, logvar = ours.encode(to_mlx_video(video))
    assert mu.shape == (1, 2, 48, 2, 2)
    assert rel_err(mu, to_starflow(mu_ref)) <= TOL
    assert rel_err(logvar, to_starflow(logvar_ref)) <= TOL

    rec_ref = diffusers_wan_decode_unclamped(ref, mu_ref)
    rec = ours.from_flow_latent(flow_latent(mu_ref))
    assert rec.shape == (1, 5, 3, 32, 32)
    assert float(np.abs(to_starflow(rec_ref)).max()) > 0.5  # a non-degenerate output scale
    assert rel_err(rec, to_starflow(rec_ref)) <= TOL
    # diffusers' public decode clamps to [-1, 1]; ours does not (the STARFlow saver clamps)
    with torch.no_grad():
        clamped = ref.decode(mu_ref).sample
    assert rel_err(mx.clip(rec, -1, 1), to_starflow(clamped)) <= TOL


@pytest.mark.parametrize("k", [0, 1, 2])
def test_frame_counts_and_parity(ref, model, k):
    frames = 1 + 4 * k
    video = random_video(frames, h=16, w=32, seed=10 + k)
    mu_ref, _ = ref_encode(ref, video)
    mu, _ = model.encode(to_mlx_video(video))
    assert mu.shape == (1, 1 + k, 48, 1, 2)
    assert rel_err(mu, to_starflow(mu_ref)) <= TOL
    # the codec's round trip at ε = 0: encode to the flow latent, decode it back, against diffusers' decode of mu
    z = model.to_flow_latent(to_mlx_video(video), noise=mx.zeros(mu.shape))
    rec = model.from_flow_latent(z)
    assert rec.shape == (1, frames, 3, 16, 32)
    assert rel_err(rec, to_starflow(diffusers_wan_decode_unclamped(ref, mu_ref))) <= TOL


@pytest.mark.parametrize("channels_last", [False, True])
def test_decode_stream_matches_diffusers_whole_clip(ref, model, channels_last):
    """Pushing one latent frame at a time (what frame streaming does) gives diffusers' whole-clip decode."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(1, 48, 3, 2, 2, generator=g) * 0.5 + torch.tensor(WAN22_LATENTS_MEAN)[None, :, None, None, None]
    want = to_starflow(diffusers_wan_decode_unclamped(ref, raw))
    z = flow_latent(raw)
    if channels_last:
        z, want = z.transpose(0, 1, 3, 4, 2), want.transpose(0, 1, 3, 4, 2)
    stream = model.decode_stream(channels_last=channels_last)
    chunks = []
    for i in range(z.shape[1]):
        chunks.append(stream.push(z[:, i]))
        assert chunks[-1].dtype == mx.float32
        # each push already gives its finished frames: they match the reference before later frames are pushed
        done = sum(c.shape[1] for c in chunks)
        assert rel_err(mx.concatenate(chunks, axis=1), want[:, :done]) <= TOL
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    assert rel_err(mx.concatenate(chunks, axis=1), want) <= TOL
    with pytest.raises(ValueError, match=r"latent frame 3 has shape"):
        stream.push(z[:, 0, :1] if channels_last else z[:, 0, :, :1])
    with pytest.raises(ValueError, match=r"latent_frame must be one latent frame"):
        stream.push(z[:, :1])


def test_latent_normalisation_and_temporal_scale(ref, model):
    video = random_video(9, seed=4)
    mu_ref, logvar_ref = ref_encode(ref, video)
    raw = to_starflow(mu_ref).astype(np.float64)
    # per-channel statistics broadcast over the channel axis (2) of (B, T, C, h, w)
    mean = np.array(WAN22_LATENTS_MEAN)[:, None, None]
    inv_std = 1.0 / np.array(WAN22_LATENTS_STD)[:, None, None]
    expected = (raw - mean) * inv_std
    expected[:, 1:] *= TS
    z = model.to_flow_latent(to_mlx_video(video), noise=mx.zeros((1, 3, 48, 2, 2)))
    assert z.shape == (1, 3, 48, 2, 2)
    assert rel_err(z, expected) <= TOL
    _, logvar = model.encode(to_mlx_video(video))
    assert rel_err(logvar, to_starflow(logvar_ref)) <= TOL  # logvar is not rescaled

    # a given ε follows STARFlow's formula; the temporal scale also scales the noise term
    eps = np.random.default_rng(0).standard_normal(z.shape)
    lv = to_starflow(logvar_ref).astype(np.float64)
    want = (raw - mean) * inv_std + np.exp(0.5 * np.clip(lv, -30, 20)) * eps
    want[:, 1:] *= TS
    assert rel_err(model.to_flow_latent(to_mlx_video(video), noise=mx.array(eps.astype(np.float32))), want) <= TOL
    # flow_posterior is that distribution: its mean and std, both scaled
    post_mean, post_std = model.flow_posterior(to_mlx_video(video))
    assert rel_err(post_mean, expected) <= TOL
    std_want = np.exp(0.5 * np.clip(lv, -30, 20))
    std_want[:, 1:] *= TS
    assert rel_err(post_std, std_want) <= TOL
    s1 = model.to_flow_latent(to_mlx_video(video), key=mx.random.key(7))
    assert mx.array_equal(s1, model.to_flow_latent(to_mlx_video(video), key=mx.random.key(7)))
    assert not mx.allclose(s1, z)

    # decoding undoes both: from_flow_latent(z) == Wan decode of the raw latent
    rec = model.from_flow_latent(z)
    assert rel_err(rec, to_starflow(diffusers_wan_decode_unclamped(ref, mu_ref))) <= TOL
    # and a model with another temporal scale decodes frames >= 1 differently, frame 0 identically
    other = WanVAE(dataclasses.replace(model.config, temporal_scale=1.0))
    other.update(model.parameters())
    rec1 = other.from_flow_latent(z)
    assert mx.allclose(rec1[:, :1], rec[:, :1], atol=1e-6) and not mx.allclose(rec1[:, 1:], rec[:, 1:], atol=1e-3)


def test_default_layout_vs_channels_last_and_image_path(model):
    video_cl = mx.random.uniform(-1, 1, (2, 5, 32, 16, 3), key=mx.random.key(5))
    video = video_cl.transpose(0, 1, 4, 2, 3)  # STARFlow's (B, T, C, H, W), the default
    z, lv = model.encode(video)
    assert z.shape == lv.shape == (2, 2, 48, 2, 1)
    zl, lvl = model.encode(video_cl, channels_last=True)
    assert zl.shape == lvl.shape == (2, 2, 2, 1, 48)
    assert mx.allclose(z, zl.transpose(0, 1, 4, 2, 3), atol=1e-6)
    assert mx.allclose(lv, lvl.transpose(0, 1, 4, 2, 3), atol=1e-6)
    r = model.from_flow_latent(z)
    assert r.shape == (2, 5, 3, 32, 16)
    rl = model.from_flow_latent(zl, channels_last=True)
    assert rl.shape == (2, 5, 32, 16, 3)
    assert mx.allclose(r, rl.transpose(0, 1, 4, 2, 3), atol=1e-5)
    first = model.decode_stream(channels_last=True).push(zl[:, 0])
    assert first.shape == (2, 1, 32, 16, 3) and mx.allclose(first, rl[:, :1], atol=1e-6)
    # the noise is read in the same layout as the latent
    eps = mx.random.normal(z.shape, key=mx.random.key(6))
    s = model.to_flow_latent(video, noise=eps)
    sl = model.to_flow_latent(video_cl, noise=eps.transpose(0, 1, 3, 4, 2), channels_last=True)
    assert s.shape == z.shape and sl.shape == zl.shape
    assert mx.allclose(s, sl.transpose(0, 1, 4, 2, 3), atol=1e-6) and not mx.allclose(s, z, atol=1e-3)

    # images: a 1-frame clip, no temporal scale (frame 0 is never scaled)
    image = video[:, 0]
    zi, _ = model.encode(image)
    assert zi.shape == (2, 48, 2, 1)
    assert mx.allclose(zi, model.encode(video[:, :1])[0][:, 0], atol=1e-6)
    assert mx.allclose(zi, z[:, 0], atol=1e-5)  # causal: frame 0's latent ignores later frames
    fi = model.to_flow_latent(image, noise=mx.zeros(zi.shape))
    assert mx.allclose(fi, model.to_flow_latent(video, noise=mx.zeros(z.shape))[:, 0], atol=1e-5)
    img = model.from_flow_latent(fi)
    assert img.shape == (2, 3, 32, 16)
    zi_cl, _ = model.encode(video_cl[:, 0], channels_last=True)
    assert zi_cl.shape == (2, 2, 1, 48) and mx.allclose(zi_cl, zi.transpose(0, 2, 3, 1), atol=1e-6)
    img_cl = model.from_flow_latent(fi.transpose(0, 2, 3, 1), channels_last=True)
    assert img_cl.shape == (2, 32, 16, 3) and mx.allclose(img_cl, img.transpose(0, 2, 3, 1), atol=1e-5)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"1 \+ 4·k frames.*got 4"):
        model.encode(mx.zeros((1, 4, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 16, got 24x32"):
        model.encode(mx.zeros((1, 1, 3, 24, 32)))
    with pytest.raises(ValueError, match="colour channels"):
        model.encode(mx.zeros((1, 1, 4, 32, 32)))
    # a channels-last clip without channels_last=True: the error names the layout it was read as
    with pytest.raises(ValueError, match=r"expected 3 colour channels, got shape \[1, 1, 32, 32, 3\] "
                       r"\(read as \(B, T, C, H, W\) or \(B, C, H, W\)\)"):
        model.encode(mx.zeros((1, 1, 32, 32, 3)))
    first, last = r"\(B, T, C, H, W\) or \(B, C, H, W\)", r"\(B, T, H, W, C\) or \(B, H, W, C\)"
    with pytest.raises(ValueError, match=rf"pixels must be {first}, got shape \[3, 32, 32\]"):
        model.encode(mx.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match=rf"pixels must be {last}, got shape \[3, 32, 32\]"):
        model.to_flow_latent(mx.zeros((3, 32, 32)), channels_last=True)
    with pytest.raises(ValueError, match=rf"expected z_dim = 48 \(shape \[1, 1, 16, 2, 2\], read as {first}\)"):
        model.from_flow_latent(mx.zeros((1, 1, 16, 2, 2)))
    with pytest.raises(ValueError, match=rf"expected z_dim = 48 \(shape \[1, 1, 2, 2, 16\], read as {last}\)"):
        model.from_flow_latent(mx.zeros((1, 1, 2, 2, 16)), channels_last=True)
    with pytest.raises(ValueError, match=rf"z_dim = 48 \(shape \[1, 16, 2, 2\], read as {first}\)"):
        model.decode_stream().push(mx.zeros((1, 16, 2, 2)))
    with pytest.raises(ValueError, match=r"noise has shape \[1, 1, 3, 2, 2\], expected \[1, 1, 48, 2, 2\]"):
        model.to_flow_latent(mx.zeros((1, 1, 3, 32, 32)), noise=mx.zeros((1, 1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"noise has shape \[1, 1, 2, 2, 3\], expected \[1, 1, 2, 2, 48\]"):
        model.to_flow_latent(mx.zeros((1, 1, 32, 32, 3)), noise=mx.zeros((1, 1, 2, 2, 3)), channels_last=True)


# ----------------------------------------------------------------------------------------------------------------
# Spatial tiling
# ----------------------------------------------------------------------------------------------------------------


def test_tiled_decode(model):
    from starflow_mlx.tiling import blend_tiles, tile_windows

    z = mx.random.normal((1, 2, 48, 3, 4), key=mx.random.key(9))
    plain = model.from_flow_latent(z)
    assert mx.array_equal(model.from_flow_latent(z, tile_size=4), plain)  # one tile covers everything: identical
    tiled = model.from_flow_latent(z, tile_size=2, tile_overlap=1)
    assert tiled.shape == plain.shape == (1, 5, 3, 48, 64)
    # each tile is a whole-clip decode of its window (its own causal cache), blended with linear ramps
    pieces = [(y0 * 16, x0 * 16, model.from_flow_latent(z[..., y0 : y0 + h, x0 : x0 + w]).transpose(0, 1, 3, 4, 2))
              for y0, x0, h, w in tile_windows(3, 4, 2, 1)]
    want = blend_tiles(pieces, 48, 64).transpose(0, 1, 4, 2, 3)
    assert float(mx.abs(tiled - want).max()) <= 1e-5 * float(mx.abs(want).max())
    # tiles do not see each other's neighbourhood, so the blend differs from the plain decode
    assert float(mx.abs(tiled - plain).max()) > 1e-3
    # the default overlap is capped at half a tile
    assert mx.array_equal(model.from_flow_latent(z, tile_size=2), tiled)
    with pytest.raises(ValueError, match="tile_overlap"):
        model.from_flow_latent(z, tile_size=2, tile_overlap=2)


def test_config_validation():
    with pytest.raises(ValueError, match="latents_mean has 48 values, expected z_dim = 8"):
        WanVAE(WanVAEConfig(z_dim=8, base_dim=4, decoder_base_dim=4))
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(temporal_downsample=(True,))
