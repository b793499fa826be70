"""Official STARFlow / STARFlow-V checkpoint (``.pth`` + YAML) -> MLX flow folder.

The official module names are kept except for three renames (``attn_blocks`` -> ``layers``, ``mlp.main.{0,2}`` ->
``mlp.fc{1,2}``, ``learnable_self_denoiser`` -> ``denoiser``); PyTorch and MLX Linear weights share the [out, in]
layout, so no tensor changes shape. The deprecated buffers are dropped; every other key must match exactly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from starflow_mlx.config import load_official_yaml
from starflow_mlx.flow import StarFlow
from starflow_mlx.weights import (
    check_state_dict,
    parse_dtype,
    quantize_model,
    read_state_dict,
    provenance,
    write_model_folder,
)

CONVERTER_VERSION = "1"
log = logging.getLogger(__name__)

# Buffers of the official model that no computation reads (spec §3); everything else is a parameter we need.
DEPRECATED = re.compile(r"^(var|blocks\.\d+\.attn_mask|feat_rope\.freqs_(cos|sin))$")
# Not quantized: proj_in's input width (latent channels) is below any group size, and proj_out produces the
# affine scale and shift directly, where quantization error would land on every sample.
QUANT_SKIP = ("proj_in", "proj_out")

_RENAMES = [
    ("learnable_self_denoiser.", "denoiser."),
    (".attn_blocks.", ".layers."),
    (".mlp.main.0.", ".mlp.fc1."),
    (".mlp.main.2.", ".mlp.fc2."),
]


def to_mlx_name(key: str) -> str:
    for official, ours in _RENAMES:
        key = key.replace(official, ours)
    return key


def to_official_name(key: str) -> str:
    for official, ours in _RENAMES:
        key = key.replace(ours, official)
    return key


def convert_flow(
    checkpoint: str | Path,
    config_yaml: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    txt_dim: int | None = None,
    overwrite: bool = False,
) -> Path:
    checkpoint, config_yaml = Path(checkpoint), Path(config_yaml)
    config = load_official_yaml(config_yaml, txt_dim)
    target_dtype = parse_dtype(dtype)
    state = read_state_dict(checkpoint)

    model = StarFlow(config)
    expected = {to_official_name(k): v.shape for k, v in tree_flatten(model.parameters())}
    check_state_dict(expected, state, checkpoint, ignore=lambda k: bool(DEPRECATED.match(k)))
    weights = {to_mlx_name(k): v.astype(target_dtype) for k, v in state.items() if not DEPRECATED.match(k)}
    del state

    quantization = None
    if q_bits:
        model.update(tree_unflatten(list(weights.items())))
        quantization = quantize_model(model, q_bits, q_group_size, skip=QUANT_SKIP)
        weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)

    folder_config = {
        **config.to_dict(),
        "dtype": dtype,
        "source": provenance([checkpoint], config=config_yaml.name),
        "converter_version": CONVERTER_VERSION,
    }
    if quantization:
        folder_config["quantization"] = quantization
    out = write_model_folder(out_dir, folder_config, weights, overwrite=overwrite)
    log.info("wrote %s (%d tensors, %s%s)", out, len(weights), dtype, f", {q_bits}-bit" if q_bits else "")
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flow", help="official STARFlow / STARFlow-V .pth + YAML -> MLX flow folder")
    p.add_argument("checkpoint", help="official checkpoint (.pth state_dict)")
    p.add_argument("config", help="official YAML config of that checkpoint")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=None, help="quantize Linear layers (MLX affine)")
    p.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--txt-dim", type=int, default=None, help="text width if the YAML's text encoder is unknown")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(
        func=lambda a: convert_flow(
            a.checkpoint, a.config, a.out, a.dtype, a.q_bits, a.q_group_size, a.txt_dim, a.overwrite
        )
    )
