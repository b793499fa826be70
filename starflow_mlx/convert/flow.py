"""Official STARFlow / STARFlow-V checkpoint (``.pth`` + YAML) -> MLX flow folder.

The names change as ``starflow_mlx.flow.OFFICIAL_NAMES`` declares (``attn_blocks`` -> ``layers``, ``mlp.main.{0,2}``
-> ``mlp.fc{1,2}``, ``learnable_self_denoiser`` -> ``denoiser``); no tensor changes shape. The deprecated buffers
(``flow.DEPRECATED``) are dropped; every other key must match exactly.
"""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from ..config import FlowConfig, load_official_yaml
from ..flow import DEPRECATED, OFFICIAL_NAMES, QUANT_SKIP, StarFlow
from ..checkpoint import read_state_dict
from ..weights import check_state_dict
from .common import add_output_arguments, check_output, write_converted

CONVERTER_VERSION = "1"


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
    out_dir = check_output(out_dir, dtype, overwrite, [checkpoint, config_yaml])
    config = load_official_yaml(config_yaml, txt_dim)
    return convert_flow_config(
        checkpoint, config, Path(config_yaml).name, out_dir, dtype, q_bits, q_group_size, overwrite
    )


def convert_flow_config(
    checkpoint: str | Path,
    config: FlowConfig,
    config_name: str,
    out_dir: str | Path,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    overwrite: bool = False,
) -> Path:
    """``convert_flow`` with the config already built (the pipeline converter's built-in configs of the released
    models); ``config_name`` is recorded as the config the source came with."""
    out_dir = check_output(out_dir, dtype, overwrite, [checkpoint])
    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint)

    model = StarFlow(config)
    expected = {OFFICIAL_NAMES.to_checkpoint(k): v.shape for k, v in tree_flatten(model.parameters())}
    check_state_dict(expected, state, checkpoint, ignore=lambda k: bool(DEPRECATED.match(k)))
    weights = OFFICIAL_NAMES.rename({k: v for k, v in state.items() if not DEPRECATED.match(k)}, checkpoint)
    del state

    return write_converted(
        out_dir, config, weights, model, dtype=dtype, sources=[checkpoint], source_extra={"config": config_name},
        converter_version=CONVERTER_VERSION, q_bits=q_bits, q_group_size=q_group_size, quant_skip=QUANT_SKIP,
        overwrite=overwrite,
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flow", help="official STARFlow / STARFlow-V .pth + YAML -> MLX flow folder")
    p.add_argument("checkpoint", help="official checkpoint (.pth state_dict)")
    p.add_argument("config", help="official YAML config of that checkpoint")
    add_output_arguments(p, quantize=True)
    p.add_argument("--txt-dim", type=int, default=None, help="text width if the YAML's text encoder is unknown")
    p.set_defaults(
        func=lambda a: convert_flow(
            a.checkpoint, a.config, a.out, a.dtype, a.q_bits, a.q_group_size, a.txt_dim, a.overwrite
        )
    )
