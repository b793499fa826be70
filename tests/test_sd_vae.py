"""SD-VAE (diffusers AutoencoderKL) in MLX: parity with diffusers, scaling, layouts, tiling and converter errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from starflow_mlx.convert.sd_vae import convert_sd_vae  # noqa: E402
from starflow_mlx import cli  # noqa: E402
from starflow_mlx.sd_vae import SDVAE, GroupNorm, SDVAEConfig, load_sd_vae  # noqa: E402
from starflow_mlx.checkpoint import CheckpointError  # noqa: E402
from starflow_mlx.weights import read_model_folder  # noqa: E402

TINY = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    norm_num_groups=8,
)
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _tiny_diffusers(seed: int = 0):
    """A tiny AutoencoderKL with randomised norms and biases and a sharp mid attention (not near-uniform)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif any(f"{k}.weight" in name for k in ("to_q", "to_k")):
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdvae")
    model = _tiny_diffusers()
    model.save_pretrained(root / "diffusers")
    out = convert_sd_vae(root / "diffusers", root / "mlx")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        ref = {"mean": post.mean.numpy(), "logvar": post.logvar.numpy(), "std": post.std.numpy()}
        ref["image"] = model.decode(z).sample.numpy()
    return dict(root=root, model=model, mlx=out, x=x.numpy(), z=z.numpy(), ref=ref)


def _rel_err(got, want) -> float:
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _old_state_dict(model, conv_attention: bool) -> dict:
    """The model's state dict under the pre-0.14 diffusers attention names (optionally as 1x1 conv kernels)."""
    out = {}
    for key, value in model.state_dict().items():
        for new, old in OLD_NAMES.items():
            marker = f".{new}."
            if ".attentions." in key and marker in key:
                key = key.replace(marker, f".{old}.")
                if conv_attention and key.endswith(".weight"):
                    value = value[:, :, None, None]
        out[key] = value.clone()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------------------------


def test_encode_decode_match_diffusers(tiny):
    vae = load_sd_vae(tiny["mlx"])
    mean, logvar = vae.encode(mx.array(tiny["x"]))
    assert _rel_err(mean, tiny["ref"]["mean"]) <= 1e-4
    assert _rel_err(logvar, tiny["ref"]["logvar"]) <= 1e-4
    # from_flow_latent() takes the scaled latent: z * 0.18215 must reproduce diffusers' decode(z).
    image = vae.from_flow_latent(mx.array(tiny["z"]) * 0.18215)
    assert _rel_err(image, tiny["ref"]["image"]) <= 1e-4
    # The mid attention is not a no-op: removing it changes the output far beyond the tolerance.
    vae.decoder.mid_block.attentions = []
    assert _rel_err(vae.from_flow_latent(mx.array(tiny["z"]) * 0.18215), tiny["ref"]["image"]) > 1e-2


def test_group_norm_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 64, 48, 64)).astype(np.float32) * 3 + 1
    weight = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    bias = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    norm = GroupNorm(8, 64)
    norm.weight, norm.bias = mx.array(weight), mx.array(bias)
    want = torch.nn.functional.group_norm(
        torch.from_numpy(x).double().permute(0, 3, 1, 2), 8, torch.from_numpy(weight).double(),
        torch.from_numpy(bias).double(), eps=1e-6,
    ).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.array(norm(mx.array(x))) - want).max() < 2e-5
    half = norm(mx.array(x).astype(mx.float16))
    assert half.dtype == mx.float16 and np.abs(np.array(half.astype(mx.float32)) - want).max() < 2e-2


@pytest.mark.parametrize("conv_attention", [False, True])
def test_old_attention_names_bin_checkpoint(tiny, tmp_path, conv_attention):
    src = tmp_path / "old"
    src.mkdir()
    (src / "config.json").write_text((tiny["root"] / "diffusers" / "config.json").read_text())
    state = _old_state_dict(tiny["model"], conv_attention)
    assert "encoder.mid_block.attentions.0.query.weight" in state
    torch.save(state, src / "diffusion_pytorch_model.bin")
    vae = load_sd_vae(convert_sd_vae(src, tmp_path / "mlx"))
    mean, logvar = vae.encode(mx.array(tiny["x"]))
    assert _rel_err(mean, tiny["ref"]["mean"]) <= 1e-4
    assert _rel_err(logvar, tiny["ref"]["logvar"]) <= 1e-4
    assert _rel_err(vae.from_flow_latent(mx.array(tiny["z"]) * 0.18215), tiny["ref"]["image"]) <= 1e-4


def test_bare_safetensors_with_config_and_inferred_architecture(tiny, tmp_path):
    bare = tmp_path / "vae.safetensors"
    safetensors_torch.save_file(_old_state_dict(tiny["model"], False), str(bare))
    cfg_path = tiny["root"] / "diffusers" / "config.json"
    vae = load_sd_vae(convert_sd_vae(bare, tmp_path / "with_config", config=cfg_path))
    assert _rel_err(vae.from_flow_latent(mx.array(tiny["z"]) * 0.18215), tiny["ref"]["image"]) <= 1e-4

    # Without a config the architecture is read off the shapes; the norm groups fall back to the SD default 32.
    cfg = json.loads((convert_sd_vae(bare, tmp_path / "inferred") / "config.json").read_text())
    assert cfg["block_out_channels"] == [32, 64]
    assert cfg["layers_per_block"] == 2
    assert cfg["latent_channels"] == 4 and cfg["in_channels"] == 3 and cfg["out_channels"] == 3
    assert cfg["norm_num_groups"] == 32 and cfg["scaling_factor"] == 0.18215


def test_starflow_sequential_prefixes(tiny, tmp_path):
    # STARFlow's fine-tuned VAE wraps (encoder, quant_conv) and (post_quant_conv, decoder) in nn.Sequential.
    prefixes = {"encoder.": "encoder.0.", "quant_conv.": "encoder.1.", "post_quant_conv.": "decoder.0.",
                "decoder.": "decoder.1."}
    state = {}
    for key, value in tiny["model"].state_dict().items():
        prefix = next(p for p in prefixes if key.startswith(p))
        state[prefixes[prefix] + key[len(prefix):]] = value.clone()
    torch.save(state, tmp_path / "finetuned.bin")
    out = convert_sd_vae(tmp_path / "finetuned.bin", tmp_path / "mlx", config=tiny["root"] / "diffusers" / "config.json")
    got, want = read_model_folder(out), read_model_folder(tiny["mlx"])
    assert sorted(got) == sorted(want)
    for key in want:
        assert mx.array_equal(got[key], want[key]), key


def test_folder_config_records_source(tiny):
    cfg = json.loads((tiny["mlx"] / "config.json").read_text())
    assert cfg["model_type"] == "sd-vae"
    assert cfg["converter_version"] == "1"
    assert cfg["dtype"] == "float32"
    assert cfg["block_out_channels"] == [32, 64] and cfg["norm_num_groups"] == 8
    assert list(cfg["source"]["files"]) == ["diffusion_pytorch_model.safetensors"]
    assert len(cfg["source"]["files"]["diffusion_pytorch_model.safetensors"]) == 64
    weights = read_model_folder(tiny["mlx"])
    # Conv kernels are stored channels-last for MLX; attention linears stay [out, in].
    assert weights["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
    assert weights["decoder.conv_out.weight"].shape == (3, 3, 3, 32)
    assert weights["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)


# ----------------------------------------------------------------------------------------------------------------
# Scaling factor, sampling and layouts
# ----------------------------------------------------------------------------------------------------------------


def test_to_flow_latent_applies_scaling_factor(tiny):
    vae = load_sd_vae(tiny["mlx"])
    eps = np.random.default_rng(3).standard_normal(tiny["ref"]["mean"].shape).astype(np.float32)
    want = (tiny["ref"]["mean"] + tiny["ref"]["std"] * eps) * 0.18215
    z = vae.to_flow_latent(mx.array(tiny["x"]), noise=mx.array(eps))
    assert _rel_err(z, want) <= 1e-4
    # Zero noise is the scaled posterior mean; keyed sampling is reproducible and actually random.
    mean = vae.to_flow_latent(mx.array(tiny["x"]), noise=mx.zeros(eps.shape))
    assert _rel_err(mean, tiny["ref"]["mean"] * 0.18215) <= 1e-4
    a = vae.to_flow_latent(mx.array(tiny["x"]), key=mx.random.key(7))
    b = vae.to_flow_latent(mx.array(tiny["x"]), key=mx.random.key(7))
    c = vae.to_flow_latent(mx.array(tiny["x"]), key=mx.random.key(8))
    assert mx.array_equal(a, b) and not mx.allclose(a, c)
    with pytest.raises(ValueError, match=r"noise has shape \[1, 4, 16, 16\]"):
        vae.to_flow_latent(mx.array(tiny["x"]), noise=mx.zeros((1, 4, 16, 16)))


def test_shift_factor():
    cfg = SDVAEConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, scaling_factor=0.5,
                      shift_factor=0.25)
    vae = SDVAE(cfg)
    x = mx.random.uniform(-1, 1, (1, 3, 8, 8), key=mx.random.key(0))
    mean, _ = vae.encode(x)
    assert mx.allclose(vae.to_flow_latent(x, noise=mx.zeros(mean.shape)), (mean - 0.25) * 0.5, atol=1e-6)
    z = mx.random.normal((1, 4, 4, 4), key=mx.random.key(1))
    want = vae.decode_nhwc((z / 0.5 + 0.25).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert mx.allclose(vae.from_flow_latent(z), want, atol=1e-6)


def test_logvar_clamp():
    # diffusers' DiagonalGaussianDistribution clamps logvar to [-30, 20] before using it.
    vae = SDVAE(SDVAEConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4))
    vae.quant_conv.bias = mx.array([0, 0, 0, 0, 500, 500, -500, -500], dtype=mx.float32)
    x = mx.random.uniform(-1, 1, (1, 3, 8, 8), key=mx.random.key(0))
    mean, logvar = vae.encode(x)
    assert bool((logvar[:, :2] == 20).all()) and bool((logvar[:, 2:] == -30).all())
    eps = mx.ones(mean.shape)
    z = vae.to_flow_latent(x, noise=eps)
    assert mx.allclose(z[:, :2], (mean[:, :2] + np.exp(10.0)) * 0.18215, rtol=1e-5)


def test_round_trip_shapes_and_layouts():
    cfg = SDVAEConfig(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
    assert cfg.downsample == 8
    vae = SDVAE(cfg)
    x = mx.random.uniform(-1, 1, (2, 3, 64, 48), key=mx.random.key(0))
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 6)
    assert float(logvar.max()) <= 20 and float(logvar.min()) >= -30
    z = vae.to_flow_latent(x, key=mx.random.key(1))
    image = vae.from_flow_latent(z)
    assert image.shape == (2, 3, 64, 48)

    # Channels-last gives the transposed result; (B, T, C, H, W) folds T into the batch.
    mean_nhwc, _ = vae.encode(x.transpose(0, 2, 3, 1), channels_last=True)
    assert mean_nhwc.shape == (2, 8, 6, 4) and mx.allclose(mean_nhwc.transpose(0, 3, 1, 2), mean, atol=1e-6)
    image_nhwc = vae.from_flow_latent(z.transpose(0, 2, 3, 1), channels_last=True)
    assert mx.allclose(image_nhwc.transpose(0, 3, 1, 2), image, atol=1e-6)
    video = vae.from_flow_latent(z[None])
    assert video.shape == (1, 2, 3, 64, 48) and mx.allclose(video[0], image, atol=1e-6)

    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(mx.zeros((1, 3, 60, 64)))
    with pytest.raises(ValueError, match=r"3 channels .* got shape \[1, 64, 64, 3\]"):
        vae.encode(mx.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="4 channels"):
        vae.from_flow_latent(mx.zeros((1, 3, 8, 8)))


# ----------------------------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------------------------


def test_tiled_decode(tiny):
    from starflow_mlx.tiling import blend_tiles, tile_windows

    vae = load_sd_vae(tiny["mlx"])
    z = mx.array(tiny["z"]) * 0.18215
    full = vae.from_flow_latent(z)
    assert mx.array_equal(vae.from_flow_latent(z, tile_size=16), full)  # one tile covers the latent: identical
    tiled = vae.from_flow_latent(z, tile_size=8, tile_overlap=4)
    assert tiled.shape == full.shape
    # each tile is a whole decode of its window, blended with linear ramps
    pieces = [(y0 * 2, x0 * 2, vae.from_flow_latent(z[..., y0 : y0 + h, x0 : x0 + w]).transpose(0, 2, 3, 1))
              for y0, x0, h, w in tile_windows(16, 16, 8, 4)]
    want = blend_tiles(pieces, 32, 32).transpose(0, 3, 1, 2)
    assert float(mx.abs(tiled - want).max()) <= 1e-5 * float(mx.abs(want).max())
    # tiles do not see each other's neighbourhood (norm statistics, attention), so the blend differs
    assert float(mx.abs(tiled - full).max()) > 1e-3
    # the default overlap is capped at half a tile
    assert mx.array_equal(vae.from_flow_latent(z, tile_size=8), tiled)


@pytest.mark.parametrize("channels_last", [False, True])
def test_decode_stream_matches_diffusers(tiny, channels_last):
    """Pushing one latent frame at a time gives diffusers' decode of each frame (the two latents as a 2-frame clip)."""
    vae = load_sd_vae(tiny["mlx"])
    z = mx.array(tiny["z"])[None] * 0.18215  # (1, 2, 4, 16, 16)
    want = tiny["ref"]["image"][None]
    if channels_last:
        z, want = z.transpose(0, 1, 3, 4, 2), want.transpose(0, 1, 3, 4, 2)
    stream = vae.decode_stream(channels_last=channels_last)
    chunks = [stream.push(z[:, i]) for i in range(2)]
    assert [c.shape[1] for c in chunks] == [1, 1] and all(c.dtype == mx.float32 for c in chunks)
    assert _rel_err(mx.concatenate(chunks, axis=1), want) <= 1e-4
    with pytest.raises(ValueError, match="latent frame 2 has shape"):
        stream.push(z[:, 0, :8] if channels_last else z[:, 0, :, :8])


def test_float16_weights_compute_in_float16(tiny):
    """A float16 model computes in float16 (not float32 with float16 weights) and hands back float32."""
    from mlx.utils import tree_map

    half = load_sd_vae(tiny["mlx"], dtype=mx.float16)
    # the float32 model with the same (float16-rounded) weights: any difference is the compute dtype's
    rounded = load_sd_vae(tiny["mlx"])
    rounded.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32), rounded.parameters()))
    x, z = mx.array(tiny["x"]), mx.array(tiny["z"]) * 0.18215
    for name, run in (("decode", lambda v: v.from_flow_latent(z)),
                      ("encode", lambda v: v.to_flow_latent(x, noise=mx.zeros((2, 4, 16, 16)))),
                      ("stream", lambda v: v.decode_stream().push(z))):
        got, want = run(half), run(rounded)
        assert got.dtype == want.dtype == mx.float32, name
        err = _rel_err(got, np.array(want))
        assert 1e-5 < err < 1e-2, (name, err)
    # and float16 is still close to diffusers' float32 decode
    assert _rel_err(half.from_flow_latent(z), tiny["ref"]["image"]) < 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Loading and converter errors
# ----------------------------------------------------------------------------------------------------------------


def test_load_dtype_and_model_type(tiny, tmp_path):
    vae = load_sd_vae(tiny["mlx"], dtype=mx.float16)
    assert vae.decoder.conv_out.weight.dtype == mx.float16
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "wan-vae"}))
    with pytest.raises(CheckpointError, match="model_type is 'wan-vae', expected 'sd-vae'"):
        load_sd_vae(bad)


def _bad_folder(tiny, path: Path, state: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text((tiny["root"] / "diffusers" / "config.json").read_text())
    safetensors_torch.save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    return path


def test_converter_shape_mismatch_reports_both_shapes(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny["model"].state_dict().items()}
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 5, 5)
    state["encoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(64, 32)
    src = _bad_folder(tiny, tmp_path / "src", state)
    with pytest.raises(CheckpointError) as err:
        convert_sd_vae(src, tmp_path / "out")
    assert "key 'encoder.conv_in.weight' has shape [32, 3, 5, 5], expected [32, 3, 3, 3]" in str(err.value)
    assert "key 'encoder.mid_block.attentions.0.to_q.weight' has shape [64, 32], expected [64, 64]" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_converter_unexpected_key_and_bad_config(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny["model"].state_dict().items()}
    state["decoder.extra.weight"] = torch.zeros(3)
    src = _bad_folder(tiny, tmp_path / "src", state)
    with pytest.raises(CheckpointError, match=r"unexpected key 'decoder.extra.weight' \(shape \[3\]\)"):
        convert_sd_vae(src, tmp_path / "out")
    cfg = json.loads((tiny["root"] / "diffusers" / "config.json").read_text())
    with pytest.raises(ValueError, match="act_fn 'gelu' is not supported"):
        convert_sd_vae(tiny["root"] / "diffusers", tmp_path / "out", config={**cfg, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="multiple of norm_num_groups 32"):
        convert_sd_vae(tiny["root"] / "diffusers", tmp_path / "out", config={**cfg, "block_out_channels": [48, 64],
                                                                             "norm_num_groups": 32})
    assert not (tmp_path / "out").exists()


def test_converter_truncated_file(tiny, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny["root"] / "diffusers" / "config.json").read_text())
    data = (tiny["root"] / "diffusers" / "diffusion_pytorch_model.safetensors").read_bytes()
    (src / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        convert_sd_vae(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_convert_and_overwrite(tiny, tmp_path):
    src, out = str(tiny["root"] / "diffusers"), str(tmp_path / "cli")
    assert cli.main(["convert", "sd-vae", src, out, "--dtype", "float16"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "float16"
    assert read_model_folder(out)["decoder.conv_out.weight"].dtype == mx.float16
    assert cli.main(["convert", "sd-vae", src, out]) == 2  # exists, no --overwrite
    assert cli.main(["convert", "sd-vae", src, out, "--overwrite"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "float32"
    assert cli.main(["convert", "sd-vae", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
