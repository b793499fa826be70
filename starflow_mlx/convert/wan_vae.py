"""Convert the Wan2.2 video VAE into an MLX model folder (``starflow-mlx convert wan-vae SRC OUT``).

Two source layouts are accepted:

- the original Wan checkpoint ``Wan2.2_VAE.pth`` (what STARFlow-V loads): keys such as ``encoder.conv1.weight``,
  ``encoder.downsamples.1.downsamples.2.time_conv.weight``, ``decoder.upsamples.0.upsamples.3.resample.1.weight``;
  the widths are read from the tensor shapes, the rest of the architecture is Wan2.2's;
- a diffusers ``AutoencoderKLWan`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, possibly
  sharded, or a pipeline folder with a ``vae/`` subfolder) configured as Wan2.2 (``is_residual``, ``patch_size`` 2).

Both become the same folder: our parameter names (``starflow_mlx/wan_vae.py``, whose ``DIFFUSERS_NAMES`` and
``original_names`` declare the renames), MLX layouts (conv weights ``[O, I, k...]`` -> ``[O, k..., I]``, 1x1 convs
-> Linear ``[O, I]``, norm gammas -> ``[C]``), and a config.json with the widths, the latent mean/std, the STARFlow
temporal scale and the source's sha256.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from ..wan_vae import (
    DIFFUSERS_NAMES,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    original_names,
)
from ..checkpoint import CheckpointError, read_state_dict
from ..config import check_value, read_json_object, shown
from ..weights import check_state_dict, shard_files
from .common import add_output_arguments, check_output, write_converted

CONVERTER_VERSION = "1"


# ----------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------


def source_shape(key: str, shape: tuple) -> tuple:
    """The PyTorch shape of the tensor that becomes our ``key`` of MLX shape ``shape``."""
    if key.endswith("attention.norm.weight"):
        return (shape[0], 1, 1)
    if re.search(r"\.norm(1|2|_out)?\.weight$", key):
        return (shape[0], 1, 1, 1)
    if len(shape) == 2:  # 1x1 convs held as Linear
        return (*shape, 1, 1) if ".attention." in key else (*shape, 1, 1, 1)
    if len(shape) == 5:
        return (shape[0], shape[4], *shape[1:4])
    if len(shape) == 4:
        return (shape[0], shape[3], *shape[1:3])
    return tuple(shape)


def to_mlx_layout(value: mx.array, shape: tuple) -> mx.array:
    if len(shape) == 5:
        return value.transpose(0, 2, 3, 4, 1)
    if len(shape) == 4:
        return value.transpose(0, 2, 3, 1)
    return value.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# Reading the sources
# ----------------------------------------------------------------------------------------------------------------


def _require(sd: dict, key: str, ndim: int, src) -> mx.array:
    if key not in sd:
        raise CheckpointError(f"{src}: missing key {key!r}, needed to read the model widths; is this Wan2.2_VAE.pth?")
    if sd[key].ndim != ndim:
        raise CheckpointError(f"{src}: key {key!r} has shape {list(sd[key].shape)}, expected a {ndim}-D tensor")
    return sd[key]


def _config_from_original(sd: dict, src, latents_mean, latents_std, arch: dict) -> WanVAEConfig:
    if "encoder.conv_in.weight" in sd and "encoder.conv1.weight" not in sd:
        raise CheckpointError(
            f"{src}: this file has diffusers AutoencoderKLWan key names; pass its folder (with config.json) instead"
        )
    conv_in = _require(sd, "encoder.conv1.weight", 5, src)
    head = _require(sd, "decoder.head.2.weight", 5, src)
    z = _require(sd, "conv2.weight", 5, src).shape[0]
    patch = arch.get("patch_size", 2)
    if conv_in.shape[1] % (patch * patch):
        raise CheckpointError(
            f"{src}: encoder.conv1.weight has {conv_in.shape[1]} input channels, not a multiple of patch_size² = "
            f"{patch * patch}"
        )
    if z != 48 and (latents_mean is None or latents_std is None):
        raise ValueError(
            f"{src}: z_dim is {z}, not Wan2.2's 48, so the built-in latent mean/std do not apply; convert this VAE's "
            "diffusers folder instead (its config.json holds them), or pass latents_mean and latents_std to "
            "starflow_mlx.convert.wan_vae.convert_wan_vae from Python"
        )
    try:
        return WanVAEConfig(
            base_dim=conv_in.shape[0],
            decoder_base_dim=head.shape[1],
            z_dim=z,
            image_channels=conv_in.shape[1] // (patch * patch),
            latents_mean=latents_mean if latents_mean is not None else WAN22_LATENTS_MEAN,
            latents_std=latents_std if latents_std is not None else WAN22_LATENTS_STD,
            **arch,
        )
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


def _diffusers_files(src: Path) -> tuple[Path, list[Path]]:
    if (src / "vae" / "config.json").is_file() and not (src / "config.json").is_file():
        src = src / "vae"
    config = src / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{src}: no config.json; expected a diffusers AutoencoderKLWan folder or a .pth file")
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return config, shard_files(index)
    single = src / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{src}: missing weights file {single.name}")
    return config, [single]


def _config_from_diffusers(path: Path, latents_mean, latents_std, temporal_scale: float) -> WanVAEConfig:
    d = read_json_object(path)
    if d.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{path}: _class_name is {shown(d.get('_class_name'))}, expected 'AutoencoderKLWan'")
    if d.get("is_residual", False) is not True:
        raise ValueError(f"{path}: is_residual is not true: that is the Wan2.1 VAE, not Wan2.2's")
    if d.get("attn_scales"):
        raise ValueError(f"{path}: attn_scales {shown(d['attn_scales'])} is not supported (Wan2.2 has none)")
    # checked before the arithmetic below; the other fields are checked by WanVAEConfig
    patch = WanVAEConfig.check_field("patch_size", d.get("patch_size") or 1, f"{path}: patch_size")
    in_ch = check_value(d.get("in_channels", 3), int, f"{path}: in_channels", {"min": 1})
    out_ch = check_value(d.get("out_channels", 3), int, f"{path}: out_channels", {"min": 1})
    if in_ch != out_ch or in_ch % (patch * patch):
        raise ValueError(
            f"{path}: in_channels {in_ch} / out_channels {out_ch} do not match patch_size {patch} "
            "(expected equal counts, a multiple of patch_size²)"
        )
    mean = latents_mean if latents_mean is not None else d.get("latents_mean")
    std = latents_std if latents_std is not None else d.get("latents_std")
    if mean is None or std is None:
        mean, std = WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
    base = d.get("base_dim", 96)
    try:
        return WanVAEConfig(
            base_dim=base,
            decoder_base_dim=d.get("decoder_base_dim") or base,
            z_dim=d.get("z_dim", 16),
            dim_mult=d.get("dim_mult", [1, 2, 4, 4]),
            num_res_blocks=d.get("num_res_blocks", 2),
            temporal_downsample=d.get("temperal_downsample", [False, True, True]),
            patch_size=patch,
            image_channels=in_ch // (patch * patch),
            latents_mean=mean,
            latents_std=std,
            temporal_scale=temporal_scale,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def convert_wan_vae(
    src: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    *,
    temporal_scale: float = 0.6,
    latents_mean: Optional[Sequence[float]] = None,
    latents_std: Optional[Sequence[float]] = None,
    dim_mult: Sequence[int] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    temporal_downsample: Sequence[bool] = (False, True, True),
) -> Path:
    """Convert ``Wan2.2_VAE.pth`` or a diffusers ``AutoencoderKLWan`` folder into an MLX folder at ``out_dir``.

    ``dim_mult``/``num_res_blocks``/``temporal_downsample`` apply to the original format only (diffusers folders
    carry them in config.json); the defaults are Wan2.2's.
    """
    out_dir = check_output(out_dir, dtype, overwrite, [src])
    src = Path(src)
    if src.is_dir():
        config_path, files = _diffusers_files(src)
        cfg = _config_from_diffusers(config_path, latents_mean, latents_std, temporal_scale)
        sd = {}
        for f in files:
            sd.update(read_state_dict(f))
        source_format, names = "diffusers", DIFFUSERS_NAMES
        sources = files
    elif src.is_file():
        sd = read_state_dict(src)
        arch = dict(dim_mult=dim_mult, num_res_blocks=num_res_blocks, temporal_downsample=temporal_downsample,
                    temporal_scale=temporal_scale)
        cfg = _config_from_original(sd, src, latents_mean, latents_std, arch)
        source_format, names = "wan", original_names(cfg.num_res_blocks).then(DIFFUSERS_NAMES)
        sources = [src]
    else:
        raise CheckpointError(f"{src}: {'not a regular file or folder' if src.exists() else 'no such file or folder'}")

    # Our parameter shapes (the model is built lazily: nothing is allocated), mapped back to source names/shapes.
    model = WanVAE(cfg)
    ours = dict(tree_flatten(model.parameters()))
    source_names = {k: names.to_checkpoint(k) for k in ours}
    check_state_dict({source_names[k]: source_shape(k, v.shape) for k, v in ours.items()}, sd, src)
    weights = {k: to_mlx_layout(sd[source_names[k]], v.shape) for k, v in ours.items()}

    return write_converted(
        out_dir, cfg, weights, model, dtype=dtype, sources=sources, source_extra={"format": source_format},
        converter_version=CONVERTER_VERSION, overwrite=overwrite,
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "wan-vae",
        help="Wan2.2 video VAE (Wan2.2_VAE.pth or a diffusers AutoencoderKLWan folder)",
        description="Convert the Wan2.2 VAE used by STARFlow-V into an MLX model folder.",
    )
    p.add_argument("src", help="Wan2.2_VAE.pth, or a diffusers AutoencoderKLWan folder (config.json + safetensors)")
    add_output_arguments(p)
    p.add_argument("--temporal-scale", type=float, default=0.6,
                   help="STARFlow's scale on latent frames >= 1 (the ':0.6' of the vae name)")
    p.set_defaults(func=lambda a: convert_wan_vae(a.src, a.out, a.dtype, a.overwrite, temporal_scale=a.temporal_scale))
