"""Wan2.2 VAE: converters (original .pth and diffusers layouts) and MLX parity with diffusers' AutoencoderKLWan.

The reference is diffusers' ``AutoencoderKLWan`` configured as Wan2.2 (residual blocks, 2x2 patchify, z_dim 48)
with tiny widths (encoder 16, decoder 24) and random weights, including non-trivial RMS-norm gammas.
"""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import mlx.core as mx  # noqa: E402

from convert.wan_vae import convert_wan_vae, diffusers_to_original  # noqa: E402
from starflow_mlx.cli import main as cli_main  # noqa: E402
from starflow_mlx.wan_vae import (  # noqa: E402
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    load_wan_vae,
)
from starflow_mlx.weights import CheckpointError, read_config, sha256_file  # noqa: E402

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


@pytest.fixture(scope="module")
def ref():
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
def folders(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    ref.save_pretrained(root / "diffusers")
    original = {diffusers_to_original(k, 2): v.clone() for k, v in ref.state_dict().items()}
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
    from starflow_mlx.weights import read_state_dict

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


def _pth_with(folders, tmp_path, edit):
    sd = {diffusers_to_original(k, 2): v.clone() for k, v in
          safetensors_torch.load_file(folders / "diffusers" / "diffusion_pytorch_model.safetensors").items()}
    edit(sd)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    return path


def test_converter_missing_key(folders, tmp_path):
    key = "decoder.upsamples.1.upsamples.3.time_conv.weight"
    src = _pth_with(folders, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.upsamples\.1\.upsamples\.3\.time_conv\.weight'"
                       r" \(expected shape \[192, 96, 3, 1, 1\]\)"):
        convert_wan_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_wrong_shape(folders, tmp_path):
    key = "encoder.middle.1.to_qkv.weight"
    src = _pth_with(folders, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(192, 64, 3, 3)))
    with pytest.raises(CheckpointError, match=r"'encoder\.middle\.1\.to_qkv\.weight' has shape \[192, 64, 3, 3\], "
                       r"expected \[192, 64, 1, 1\]"):
        convert_wan_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_converter_truncated_file(folders, tmp_path, kind):
    if kind == "pth":
        data = (folders / "Wan2.2_VAE.pth").read_bytes()
        src = tmp_path / "cut.pth"
        src.write_bytes(data[: len(data) // 2])
    else:
        src = tmp_path / "d"
        shutil.copytree(folders / "diffusers", src)
        f = src / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth|diffusion_pytorch_model.safetensors"):
        convert_wan_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_converter_refuses_code_pickle_and_diffusers_file(folders, tmp_path):
    from starflow_mlx.weights import UnsafeCheckpointError

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
    with pytest.raises(FileExistsError, match="already exists"):
        convert_wan_vae(folders / "Wan2.2_VAE.pth", folders / "mlx_wan")


def test_cli(folders, tmp_path):
    out = tmp_path / "cli_out"
    assert cli_main(["convert", "wan-vae", str(folders / "Wan2.2_VAE.pth"), str(out), "--dtype", "bfloat16"]) == 0
    cfg = read_config(out)
    assert cfg["dtype"] == "bfloat16" and cfg["source"]["format"] == "wan"
    assert load_wan_vae(out).dtype == mx.bfloat16
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
    mu, logvar = ours.encode(to_mlx_video(video), normalize=False)
    assert mu.shape == (1, 2, 48, 2, 2)
    assert rel_err(mu, to_starflow(mu_ref)) <= TOL
    assert rel_err(logvar, to_starflow(logvar_ref)) <= TOL

    rec_ref = diffusers_wan_decode_unclamped(ref, mu_ref)
    rec = ours.decode(mx.array(to_starflow(mu_ref)), normalize=False)
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
    mu, _ = model.encode(to_mlx_video(video), normalize=False)
    assert mu.shape == (1, 1 + k, 48, 1, 2)
    assert rel_err(mu, to_starflow(mu_ref)) <= TOL
    rec = model.decode(mu, normalize=False)
    assert rec.shape == (1, frames, 3, 16, 32)
    assert rel_err(rec, to_starflow(diffusers_wan_decode_unclamped(ref, mu_ref))) <= TOL


def test_decode_frames_streams_and_equals_whole_clip(model):
    z = mx.random.normal((1, 3, 48, 2, 2), key=mx.random.key(3))
    gen = model.decode_frames(z)
    assert inspect.isgenerator(gen)
    chunks = list(gen)
    assert [c.shape for c in chunks] == [(1, 1, 3, 32, 32), (1, 4, 3, 32, 32), (1, 4, 3, 32, 32)]
    whole = model.decode(z)
    assert whole.shape == (1, 9, 3, 32, 32)
    assert mx.array_equal(mx.concatenate(chunks, axis=1), whole)
    # the stream is causal: frames from the first two latent frames do not depend on the third
    prefix = mx.concatenate(list(model.decode_frames(z[:, :2])), axis=1)
    assert mx.allclose(prefix, whole[:, :5], atol=1e-6)


def test_latent_normalisation_and_temporal_scale(ref, model):
    video = random_video(9, seed=4)
    mu_ref, logvar_ref = ref_encode(ref, video)
    raw = to_starflow(mu_ref).astype(np.float64)
    # per-channel statistics broadcast over the channel axis (2) of (B, T, C, h, w)
    mean = np.array(WAN22_LATENTS_MEAN)[:, None, None]
    inv_std = 1.0 / np.array(WAN22_LATENTS_STD)[:, None, None]
    expected = (raw - mean) * inv_std
    expected[:, 1:] *= TS
    z, logvar = model.encode(to_mlx_video(video))
    assert z.shape == (1, 3, 48, 2, 2)
    assert rel_err(z, expected) <= TOL
    assert rel_err(logvar, to_starflow(logvar_ref)) <= TOL  # logvar is not rescaled

    # sample with a given ε follows STARFlow's formula; the temporal scale also scales the noise term
    eps = np.random.default_rng(0).standard_normal(z.shape)
    lv = to_starflow(logvar_ref).astype(np.float64)
    want = (raw - mean) * inv_std + np.exp(0.5 * np.clip(lv, -30, 20)) * eps
    want[:, 1:] *= TS
    assert rel_err(model.sample(to_mlx_video(video), noise=mx.array(eps.astype(np.float32))), want) <= TOL
    s1 = model.sample(to_mlx_video(video), mx.random.key(7))
    assert mx.array_equal(s1, model.sample(to_mlx_video(video), mx.random.key(7)))
    assert not mx.allclose(s1, z)

    # decode undoes both: decode(z) == Wan decode of the raw latent
    rec = model.decode(z)
    assert rel_err(rec, to_starflow(diffusers_wan_decode_unclamped(ref, mu_ref))) <= TOL
    # and a different temporal scale gives a different decode of frames >= 1 only
    other = model.decode(z, temporal_scale=1.0)
    assert mx.allclose(other[:, :1], rec[:, :1], atol=1e-6) and not mx.allclose(other[:, 1:], rec[:, 1:], atol=1e-3)


def test_layout_parameter_matches_sd_vae():
    from starflow_mlx.sd_vae import SDVAE

    for method in (WanVAE.encode, WanVAE.sample, WanVAE.decode, WanVAE.decode_frames):
        params = inspect.signature(method).parameters
        assert [n for n in params if n.startswith("channels")] == ["channels_last"], method.__name__
        p = params["channels_last"]
        assert p.default is False and p.kind is inspect.Parameter.KEYWORD_ONLY, method.__name__
    for method in (SDVAE.encode, SDVAE.sample, SDVAE.decode):
        assert inspect.signature(method).parameters["channels_last"].default is False


def test_default_layout_vs_channels_last_and_image_path(model):
    video_cl = mx.random.uniform(-1, 1, (2, 5, 32, 16, 3), key=mx.random.key(5))
    video = video_cl.transpose(0, 1, 4, 2, 3)  # STARFlow's (B, T, C, H, W), the default
    z, lv = model.encode(video)
    assert z.shape == lv.shape == (2, 2, 48, 2, 1)
    zl, lvl = model.encode(video_cl, channels_last=True)
    assert zl.shape == lvl.shape == (2, 2, 2, 1, 48)
    assert mx.allclose(z, zl.transpose(0, 1, 4, 2, 3), atol=1e-6)
    assert mx.allclose(lv, lvl.transpose(0, 1, 4, 2, 3), atol=1e-6)
    r = model.decode(z)
    assert r.shape == (2, 5, 3, 32, 16)
    rl = model.decode(zl, channels_last=True)
    assert rl.shape == (2, 5, 32, 16, 3)
    assert mx.allclose(r, rl.transpose(0, 1, 4, 2, 3), atol=1e-5)
    first = next(model.decode_frames(zl, channels_last=True))
    assert first.shape == (2, 1, 32, 16, 3) and mx.allclose(first, rl[:, :1], atol=1e-6)
    # sample's noise is read in the same layout as the latent
    eps = mx.random.normal(z.shape, key=mx.random.key(6))
    s = model.sample(video, noise=eps)
    sl = model.sample(video_cl, noise=eps.transpose(0, 1, 3, 4, 2), channels_last=True)
    assert s.shape == z.shape and sl.shape == zl.shape
    assert mx.allclose(s, sl.transpose(0, 1, 4, 2, 3), atol=1e-6) and not mx.allclose(s, z, atol=1e-3)

    # images: a 1-frame clip, no temporal scale (frame 0 is never scaled)
    image = video[:, 0]
    zi, _ = model.encode(image)
    assert zi.shape == (2, 48, 2, 1)
    assert mx.allclose(zi, model.encode(video[:, :1])[0][:, 0], atol=1e-6)
    assert mx.allclose(zi, z[:, 0], atol=1e-5)  # causal: frame 0's latent ignores later frames
    img = model.decode(zi)
    assert img.shape == (2, 3, 32, 16)
    zi_cl, _ = model.encode(video_cl[:, 0], channels_last=True)
    assert zi_cl.shape == (2, 2, 1, 48) and mx.allclose(zi_cl, zi.transpose(0, 2, 3, 1), atol=1e-6)
    img_cl = model.decode(zi_cl, channels_last=True)
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
    with pytest.raises(ValueError, match=rf"video must be {first}, got shape \[3, 32, 32\]"):
        model.encode(mx.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match=rf"video must be {last}, got shape \[3, 32, 32\]"):
        model.encode(mx.zeros((3, 32, 32)), channels_last=True)
    with pytest.raises(ValueError, match=rf"expected z_dim = 48 \(shape \[1, 1, 16, 2, 2\], read as {first}\)"):
        model.decode(mx.zeros((1, 1, 16, 2, 2)))
    with pytest.raises(ValueError, match=rf"expected z_dim = 48 \(shape \[1, 1, 2, 2, 16\], read as {last}\)"):
        model.decode(mx.zeros((1, 1, 2, 2, 16)), channels_last=True)
    with pytest.raises(ValueError, match=rf"z_dim = 48 \(shape \[1, 1, 16, 2, 2\], read as {first}\)"):
        next(model.decode_frames(mx.zeros((1, 1, 16, 2, 2))))
    with pytest.raises(ValueError, match=r"noise has shape \[1, 1, 3, 2, 2\], expected \[1, 1, 48, 2, 2\]"):
        model.sample(mx.zeros((1, 1, 3, 32, 32)), noise=mx.zeros((1, 1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"noise has shape \[1, 1, 2, 2, 3\], expected \[1, 1, 2, 2, 48\]"):
        model.sample(mx.zeros((1, 1, 32, 32, 3)), noise=mx.zeros((1, 1, 2, 2, 3)), channels_last=True)


# ----------------------------------------------------------------------------------------------------------------
# Spatial tiling
# ----------------------------------------------------------------------------------------------------------------


def test_tiled_decode(model):
    z = mx.random.normal((1, 2, 48, 3, 4), key=mx.random.key(9))
    plain = model.decode(z)
    assert mx.array_equal(model.decode(z, tile_size=4), plain)  # one tile covers everything: identical
    tiled = model.decode(z, tile_size=2, tile_overlap=1)
    assert tiled.shape == plain.shape == (1, 5, 3, 48, 64)
    assert bool(mx.all(mx.isfinite(tiled)))
    # tiles only see their own context, so the blend approximates the plain decode but is not equal to it
    diff = float(mx.abs(tiled - plain).max())
    assert 0 < diff < float(mx.abs(plain).max()) * 4
    with pytest.raises(ValueError, match="tile_overlap"):
        model.decode(z, tile_size=2, tile_overlap=2)


def test_config_validation():
    with pytest.raises(ValueError, match="latents_mean has 48 values, expected z_dim = 8"):
        WanVAE(WanVAEConfig(z_dim=8, base_dim=4, decoder_base_dim=4))
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(temporal_downsample=(True,))
