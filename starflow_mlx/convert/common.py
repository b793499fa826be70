"""What every converter shares: the checks before reading, the one path that writes a converted folder, and the
command-line options."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import Config
from ..weights import (
    DTYPES,
    cast_floating,
    check_output_folder,
    parse_dtype,
    provenance,
    quantize_model,
    write_model_folder,
)

log = logging.getLogger(__name__)


def check_output(
    out_dir: str | os.PathLike, dtype: str, overwrite: bool, sources: Sequence[str | os.PathLike]
) -> Path:
    """What a converter checks first, before reading anything: a known ``dtype``, and an output folder that is safe
    to write and never one of ``sources`` (the paths the user named) nor holds one (``check_output_folder``).
    Returns ``out_dir`` as an absolute Path."""
    parse_dtype(dtype)
    return check_output_folder(out_dir, overwrite, sources)


def write_converted(
    out_dir: str | os.PathLike,
    config: Config,
    weights: dict[str, mx.array],
    model: nn.Module,
    *,
    dtype: str,
    sources: Sequence[str | os.PathLike],
    converter_version: str,
    source_extra: dict | None = None,
    config_extra: dict | None = None,
    q_bits: int | None = None,
    q_group_size: int = 64,
    quant_skip: Iterable[str] = (),
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write converted ``weights`` (our names and layouts) as an MLX model folder, atomically; returns its path.

    The floating weights are cast to ``dtype`` (refused, naming the key, when not finite or beyond its range); with
    ``q_bits`` they are loaded into ``model`` (built from ``config``) and its Linear layers quantized, except those
    whose name contains a ``quant_skip`` entry.
    config.json holds ``config`` (with its ``model_type``), the dtype, ``config_extra``, the ``source`` block (the
    sha256 of each of ``sources``, plus ``source_extra``), the converter version and the quantization.
    """
    source = sources[0] if len(sources) == 1 else Path(sources[0]).parent  # a file, or the folder of the shards
    weights = cast_floating(weights, parse_dtype(dtype), source)
    quantization = None
    if q_bits:
        model.update(tree_unflatten(list(weights.items())))
        quantization = quantize_model(model, q_bits, q_group_size, skip=quant_skip)
        weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)

    folder_config = {
        **config.to_dict(),
        "dtype": dtype,
        **(config_extra or {}),
        "source": provenance(sources, **(source_extra or {})),
        "converter_version": converter_version,
    }
    if quantization:
        folder_config["quantization"] = quantization
    out = write_model_folder(out_dir, folder_config, weights, overwrite=overwrite, extra_files=extra_files)
    log.info("wrote %s (%d tensors, %s%s)", out, len(weights), dtype, f", {q_bits}-bit" if q_bits else "")
    return out


def add_output_arguments(parser: argparse.ArgumentParser, quantize: bool = False) -> None:
    """The arguments every ``convert <kind>`` shares, after its source arguments: OUT, ``--dtype``,
    ``--overwrite`` and, where the converter quantizes, ``--q-bits`` / ``--q-group-size``."""
    parser.add_argument("out", help="output folder (written atomically; never one holding a source)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the stored weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing model folder (never a folder of other files)"
    )
    if quantize:
        parser.add_argument(
            "--q-bits", type=int, choices=[4, 8], default=None, help="quantize Linear layers (MLX affine)"
        )
        parser.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
