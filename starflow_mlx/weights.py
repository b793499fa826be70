"""MLX model folders: writing them atomically, reading them back, and checking and renaming weights.

Shared by every converter (flow, T5, VAEs) and by the model loaders (checkpoint files are read by ``checkpoint``):

- ``write_model_folder``: ``config.json`` plus safetensors shards (5 GiB each, ``model-0000i-of-0000N``) and a
  ``model.safetensors.index.json``, the mlx-lm layout, written to a temporary folder and renamed into place.
- ``read_model_folder`` / ``load_weights_into``: the reverse, with transparent loading of quantized Linear layers.
- ``check_state_dict`` and ``KeyMap``: every key present with its shape, and the renames between a checkpoint's
  names and ours, declared as template tables beside each model (``flow.OFFICIAL_NAMES``, ``t5.HF_NAMES``, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import CheckpointError, read_safetensors

SHARD_BYTES = 5 << 30
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


# ----------------------------------------------------------------------------------------------------------------
# Checking names and shapes
# ----------------------------------------------------------------------------------------------------------------


def check_state_dict(
    expected: dict[str, tuple], got: dict[str, mx.array], source: str | os.PathLike, ignore: Callable[[str], bool] = None
) -> None:
    """Every expected key present with its shape, nothing unexpected (except what ``ignore`` accepts)."""
    problems = []
    for key, shape in expected.items():
        if key not in got:
            problems.append(f"missing key {key!r} (expected shape {list(shape)})")
        elif tuple(got[key].shape) != tuple(shape):
            problems.append(f"key {key!r} has shape {list(got[key].shape)}, expected {list(shape)}")
    for key in got:
        if key not in expected and not (ignore and ignore(key)):
            problems.append(f"unexpected key {key!r} (shape {list(got[key].shape)})")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{source}: {len(problems)} problem(s) with the weights:\n  {shown}{more}")


# Fields every KeyMap knows: a layer index, and any run of characters before or after a renamed part.
KEY_FIELDS = {"i": r"\d+", "pre": r".+", "rest": r".+"}


class KeyMap:
    """The renames between a checkpoint's parameter names and ours, declared as ``(checkpoint, ours)`` template pairs.

    A template is a whole parameter name in which ``{field}`` stands for a part matched by the regular expression
    ``fields[field]`` (``KEY_FIELDS`` plus the map's own): ``("encoder.block.{i}.layer.0.layer_norm.weight",
    "layers.{i}.attention_norm.weight")``. Each pair is a rewrite rule and every rule applies in turn: ``to_ours``
    goes through the pairs first to last, and each pair whose checkpoint template matches the whole name (as the
    earlier pairs left it) rewrites it into its own template with the same field values; ``to_checkpoint`` goes
    the other way, last to first. A name that no template matches is kept. So rules that rename different parts of
    one name (``{pre}.attn_blocks.{rest}`` and ``{pre}.mlp.main.0.{rest}``) compose, and ``then`` chains two maps
    through an intermediate naming; the rules of a map must not match each other's results.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], fields: dict[str, str] | None = None):
        fields = {**KEY_FIELDS, **(fields or {})}
        # (checkpoint regex, our regex), (checkpoint template, our template): index 0 is the checkpoint side.
        self.rules = [((_template_regex(a, fields), _template_regex(b, fields)), (a, b)) for a, b in pairs]

    def then(self, other: "KeyMap") -> "KeyMap":
        """Checkpoint names of ``self`` <-> our names of ``other``, where ``self``'s names are ``other``'s checkpoint
        names (original Wan -> diffusers -> ours)."""
        chained = KeyMap([])
        chained.rules = self.rules + other.rules
        return chained

    def to_ours(self, name: str) -> str:
        return self._apply(name, self.rules, 0)

    def to_checkpoint(self, name: str) -> str:
        return self._apply(name, reversed(self.rules), 1)

    def rename(self, state: dict[str, mx.array], source: str | os.PathLike) -> dict[str, mx.array]:
        """``state`` under our names; two checkpoint keys that become the same name are an error."""
        out, origin = {}, {}
        for key, value in state.items():
            name = self.to_ours(key)
            if name in out:
                raise CheckpointError(f"{source}: keys {origin[name]!r} and {key!r} both stand for {name!r}")
            out[name], origin[name] = value, key
        return out

    @staticmethod
    def _apply(name: str, rules, side: int) -> str:
        """Rewrite ``name`` from ``side`` (0: checkpoint, 1: ours) to the other side."""
        for patterns, templates in rules:
            match = patterns[side].fullmatch(name)
            if match:
                name = templates[1 - side].format(**match.groupdict())
        return name


def _template_regex(template: str, fields: dict[str, str]) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field name, literal, ..., literal
    return re.compile("".join(f"(?P<{p}>{fields[p]})" if i % 2 else re.escape(p) for i, p in enumerate(parts)))


# ----------------------------------------------------------------------------------------------------------------
# MLX model folders
# ----------------------------------------------------------------------------------------------------------------


def _shards(weights: dict[str, mx.array], shard_bytes: int) -> list[dict[str, mx.array]]:
    shards, current, size = [], {}, 0
    for key, value in weights.items():
        if current and size + value.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += value.nbytes
    shards.append(current)
    return shards


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir`` as a Path; an existing one is refused unless ``overwrite`` (converters ask before reading)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite / --overwrite to replace it)")
    return out_dir


def write_model_folder(
    out_dir: str | os.PathLike,
    config: dict,
    weights: dict[str, mx.array],
    *,
    overwrite: bool = False,
    shard_bytes: int | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``config.json``, sharded safetensors and the index into ``out_dir``, atomically.

    Everything is written into a hidden temporary folder beside ``out_dir`` and renamed at the end; any failure
    (including Ctrl-C) removes the temporary folder, so ``out_dir`` is either complete or absent.
    """
    out_dir = check_output_folder(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        tmp.mkdir()
        shards = _shards(weights, shard_bytes or SHARD_BYTES)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            for key, value in shard.items():
                weight_map[key] = name
                total += value.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; is this a converted starflow-mlx model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def read_model_folder(folder: str | os.PathLike) -> dict[str, mx.array]:
    """All weights of a model folder, from its index (or every ``*.safetensors`` when there is no index)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors weights found")
    weights = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: the index names {name}, which is missing")
        weights.update(read_safetensors(path))
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Quantization (MLX affine, the mlx-lm convention: a "quantization" block in config.json)
# ----------------------------------------------------------------------------------------------------------------


def quantizable(path: str, module: nn.Module, group_size: int, skip: Iterable[str] = ()) -> bool:
    """Linear layers whose input width is a multiple of the group size, except names containing ``skip``."""
    return (
        isinstance(module, nn.Linear)
        and module.weight.shape[-1] % group_size == 0
        and not any(s in path for s in skip)
    )


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, skip: Iterable[str] = ()) -> dict:
    """Quantize ``model`` in place; return the ``quantization`` block to record in ``config.json``."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"quantization group size must be 32, 64 or 128, got {group_size}")
    skip = tuple(skip)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda p, m: quantizable(p, m, group_size, skip))
    return {"group_size": group_size, "bits": bits}


def load_weights_into(model: nn.Module, weights: dict[str, mx.array], config: dict, source: str | os.PathLike) -> nn.Module:
    """Load ``weights`` into ``model`` strictly; quantize first the Linear layers that were saved quantized."""
    quant = config.get("quantization")
    if quant:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: isinstance(m, nn.Linear) and f"{p}.scales" in weights,
        )
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_state_dict(expected, weights, source)
    model.update(tree_unflatten(list(weights.items())))
    return model


def load_model(
    folder: str | os.PathLike,
    config_class: type,
    build: Callable[[Any], nn.Module],
    dtype: "str | mx.Dtype | None" = None,
) -> nn.Module:
    """Build a component from a converted folder and load its weights strictly.

    ``config_class`` (a ``Config`` subclass) names the expected ``model_type`` and parses ``config.json``; ``build``
    makes the module from that config; ``dtype`` casts the floating weights (``None`` keeps the stored ones).
    """
    raw = read_config(folder)
    kind = config_class.model_type
    if raw.get("model_type") != kind:
        raise CheckpointError(
            f"{folder}: model_type is {raw.get('model_type')!r}, expected {kind!r} "
            f"(convert it with `starflow-mlx convert {kind}`)"
        )
    try:
        config = config_class.from_dict(raw, source=str(Path(folder) / CONFIG_NAME))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = build(config)
    weights = read_model_folder(folder)
    if dtype is not None:
        weights = cast_floating(weights, parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    load_weights_into(model, weights, raw, folder)
    model.eval()
    mx.eval(model.parameters())
    return model


def compute_dtype(module: nn.Module) -> mx.Dtype:
    """The dtype policy of every component, in one place: a component computes in the dtype of its floating
    weights (for a quantized layer, its scales), casts its inputs to it at its entry, and hands float32 to the
    next component. Numerically sensitive steps (the flow's affine step and likelihood, RoPE tables, the VAE
    latent normalisation) run in float32 whatever the weights."""
    for _, value in tree_flatten(module.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(name: str) -> mx.Dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def provenance(files, **extra) -> dict:
    """The ``source`` block every converter records: each source file's sha256, plus converter-specific fields."""
    return {"files": {Path(f).name: sha256_file(f) for f in files}, **extra}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
