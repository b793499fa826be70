"""Convert a diffusers ``AutoencoderKL`` (SD VAE, e.g. ``stabilityai/sd-vae-ft-ema``) into an MLX model folder.

Accepted sources:

- a diffusers folder: ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or ``.bin``, or a single other
  ``*.safetensors`` / ``*.bin``); a pipeline folder with a ``vae/`` subfolder works too;
- a bare ``.safetensors`` / ``.bin`` file: the architecture then comes from ``config=`` (a diffusers config.json)
  when given, otherwise it is read off the tensor shapes (norm groups and scaling factor keep the SD defaults).

Key names: the diffusers names, or the other spellings ``starflow_mlx.sd_vae.ALIASES`` declares (the attention
names of diffusers < 0.14, ``query/key/value/proj_attn``, and the ``encoder.0/encoder.1/decoder.0/decoder.1``
prefixes of STARFlow's fine-tuned VAE checkpoints); old-style attention weights stored as 1x1 convolutions
``[C, C, 1, 1]`` are squeezed to ``[C, C]``. Everything else must match exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..sd_vae import ALIASES, SDVAE, SDVAEConfig
from ..checkpoint import CheckpointError, read_state_dict
from ..config import read_json_object, shown
from ..weights import check_state_dict
from .common import add_output_arguments, check_output, write_converted

CONVERTER_VERSION = "1"
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)

log = logging.getLogger(__name__)


def _locate(src: Path, config: str | os.PathLike | dict | None) -> tuple[Path, SDVAEConfig | None]:
    """The weights file and the architecture from the diffusers config (None when it must be inferred from the
    shapes), checked before any weight is read."""
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if src.is_dir():
        folder = src / "vae" if (src / "vae" / "config.json").is_file() and not (src / "config.json").is_file() else src
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if weights is None:
            found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            if len(found) != 1:
                raise CheckpointError(
                    f"{folder}: expected diffusion_pytorch_model.safetensors (or .bin) or exactly one "
                    f"*.safetensors / *.bin file, found {[p.name for p in found]}"
                )
            weights = found[0]
        if config is None:
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder}: no config.json (pass a bare weights file to infer the architecture)")
            config = folder / "config.json"
    else:
        weights = src
    if config is None:
        return weights, None
    if isinstance(config, dict):
        return weights, _architecture(config, src)
    return weights, _architecture(read_json_object(config), config)


def _architecture(diffusers_config: dict, source) -> SDVAEConfig:
    class_name = diffusers_config.get("_class_name", "AutoencoderKL")  # absent from hand-written configs
    if class_name != "AutoencoderKL":
        raise CheckpointError(
            f"{source}: _class_name is {shown(class_name)}, not 'AutoencoderKL': not the config of an SD VAE (for a "
            "pipeline, pass its vae/ folder)"
        )
    try:
        return SDVAEConfig.from_diffusers(diffusers_config)
    except ValueError as e:
        raise ValueError(f"{source}: unsupported VAE config: {e}") from None


def _squeeze_attention(state: dict[str, mx.array]) -> dict[str, mx.array]:
    """Attention weights stored as 1x1 convolutions ``[C, C, 1, 1]`` (old diffusers) -> Linear ``[C, C]``."""
    return {
        key: value.reshape(value.shape[:2])
        if ".attentions." in key and key.endswith(".weight") and value.ndim == 4 and value.shape[2:] == (1, 1)
        else value
        for key, value in state.items()
    }


def _infer_config(state: dict[str, mx.array], source: Path) -> dict:
    """Architecture of a bare weights file, read off its shapes (torch layout)."""

    def shape(key):
        if key not in state:
            raise CheckpointError(f"{source}: cannot infer the VAE architecture: missing key {key!r}")
        return state[key].shape

    widths = []
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in state:
        widths.append(int(state[f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"].shape[0]))
    if not widths:
        raise CheckpointError(f"{source}: cannot infer the VAE architecture: no encoder.down_blocks.0 weights")
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state:
        layers += 1
    cfg = {
        "in_channels": int(shape("encoder.conv_in.weight")[1]),
        "out_channels": int(shape("decoder.conv_out.weight")[0]),
        "latent_channels": int(shape("decoder.conv_in.weight")[1]),
        "block_out_channels": widths,
        "layers_per_block": layers,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in state),
    }
    log.info("inferred the VAE architecture from the weights (norm_num_groups 32, scaling_factor 0.18215): %s", cfg)
    return cfg


def _torch_shape(mlx_shape: tuple) -> tuple:
    """PyTorch layout of a parameter whose MLX shape is given: conv kernels are [O, kH, kW, I] in MLX."""
    if len(mlx_shape) == 4:
        o, kh, kw, i = mlx_shape
        return (o, i, kh, kw)
    return tuple(mlx_shape)


def convert_sd_vae(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    config: str | os.PathLike | dict | None = None,
) -> Path:
    """Convert ``src`` (diffusers VAE folder or weights file) into the MLX folder ``out_dir``; return its path."""
    named = [src] + ([config] if isinstance(config, (str, os.PathLike)) else [])
    out_dir = check_output(out_dir, dtype, overwrite, named)
    src = Path(src)
    weights_path, cfg = _locate(src, config)
    state = _squeeze_attention(ALIASES.rename(read_state_dict(weights_path), weights_path))
    if cfg is None:
        cfg = _architecture(_infer_config(state, weights_path), weights_path)

    model = SDVAE(cfg)
    expected = {k: _torch_shape(v.shape) for k, v in tree_flatten(model.parameters())}
    check_state_dict(expected, state, weights_path)

    weights = {key: value.transpose(0, 2, 3, 1) if value.ndim == 4 else value for key, value in sorted(state.items())}

    return write_converted(
        out_dir, cfg, weights, model, dtype=dtype, sources=[weights_path], converter_version=CONVERTER_VERSION,
        overwrite=overwrite,
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sd-vae",
        help="SD image VAE (diffusers AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema) for STARFlow text-to-image",
        description=(
            "Convert a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors/.bin) or a "
            "bare weights file into an MLX model folder."
        ),
    )
    p.add_argument("src", help="diffusers VAE folder, or a .safetensors / .bin weights file")
    add_output_arguments(p)
    p.add_argument("--config", default=None, help="diffusers config.json to use for a bare weights file")
    p.set_defaults(func=lambda a: convert_sd_vae(a.src, a.out, dtype=a.dtype, overwrite=a.overwrite, config=a.config))
