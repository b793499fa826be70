"""Hugging Face T5 folder (flan-T5-XL) -> MLX T5 encoder folder.

Accepted sources: a folder with ``config.json`` and ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded ``pytorch_model-*.bin`` with its index, written
by ``T5ForConditionalGeneration`` / ``T5EncoderModel`` (keys ``encoder.*`` plus ``shared.weight``) or a bare
``T5Stack`` state dict (keys ``block.*``, ``embed_tokens.weight``). Only the encoder is kept: ``decoder.*`` and
``lm_head.*`` are ignored and, where an index says a shard holds nothing else, that shard is never read. Pickled
checkpoints go through ``read_state_dict`` (weights only; nothing in the pickle is executed).

Names change as ``starflow_mlx.t5.HF_NAMES`` declares (``encoder.block.{i}.layer.0.SelfAttention.q`` ->
``layers.{i}.attention.q`` ...; the tied ``shared`` embedding stands for ``encoder.embed_tokens``); Linear weights
keep their [out, in] layout. The tokenizer (``spiece.model``, and ``tokenizer.json`` /
``tokenizer_config.json`` / ``special_tokens_map.json`` when present) is copied next to the weights.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import MAX_TOKENIZER_BYTES, check_value, read_file_bytes, read_json_object, shown
from ..t5 import HF_NAMES, T5Config, T5Encoder
from ..tokenizer import check_vocabulary, sentencepiece_model
from ..checkpoint import CheckpointError, read_state_dict
from ..weights import TOKENIZER_FILES, check_state_dict, file_in_folder, shard_files
from .common import add_output_arguments, check_output, write_converted

CONVERTER_VERSION = "1"

# Kept in full precision when quantizing: the embedding is a lookup table (quantizing it would only save memory
# at the cost of every token's vector) and the relative bias is tiny.
QUANT_SKIP = ("embed_tokens", "relative_attention_bias")

# Hugging Face T5Config defaults for the optional fields (its feed_forward_proj default is "relu", the original T5).
_HF_OPTIONAL = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
_HF_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


def _ignored(key: str) -> bool:
    """Keys of a full T5 that the encoder never reads."""
    return key.startswith(("decoder.", "lm_head."))


def read_hf_config(src: Path) -> tuple[T5Config, dict]:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; expected a Hugging Face T5 model folder")
    hf = read_json_object(path)
    model_type = hf.get("model_type", "t5")
    if model_type == "umt5":
        raise CheckpointError(f"{path}: model_type 'umt5' has a relative bias per layer; only T5 / mT5 are supported")
    if model_type not in ("t5", "mt5"):
        raise CheckpointError(f"{path}: model_type {shown(model_type)} is not a T5 model (expected 't5' or 'mt5')")
    missing = [k for k in _HF_REQUIRED if k not in hf]
    if missing:
        raise CheckpointError(f"{path}: missing T5 config field(s) {', '.join(missing)}")
    check_value(hf.get("_name_or_path", ""), str, f"{path}: _name_or_path")  # recorded in our config.json
    fields = {k: hf[k] for k in _HF_REQUIRED}
    fields.update({k: hf.get(k, default) for k, default in _HF_OPTIONAL.items()})
    try:
        config = T5Config(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, hf


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint files holding encoder weights, safetensors first."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            files = shard_files(index, keep=lambda key: not _ignored(key))
            if not files:
                raise CheckpointError(f"{index}: lists no encoder weights")
            return files
        if (src / single).is_file():
            return [src / single]
    raise CheckpointError(
        f"{src}: no weights found (looked for model.safetensors[.index.json] and pytorch_model.bin[.index.json])"
    )


def _normalize_keys(state: dict[str, mx.array], source: Path) -> dict[str, mx.array]:
    """Bring every key into the ``encoder.*`` namespace and resolve the tied embedding. A bare ``T5Stack`` key and
    its ``encoder.*`` form are two weights for one: refused, as keeping either would drop the other silently."""
    out = {}
    for key, value in state.items():
        if _ignored(key):
            continue
        name = key if key == "shared.weight" or key.startswith("encoder.") else "encoder." + key
        if name in out:
            other = name if name != key else name.removeprefix("encoder.")
            raise CheckpointError(f"{source}: keys {shown(other)} and {shown(key)} both stand for the weight "
                                  f"{shown(name)}")
        out[name] = value
    shared = out.pop("shared.weight", None)
    if "encoder.embed_tokens.weight" not in out and shared is not None:
        out["encoder.embed_tokens.weight"] = shared
    return out


def _tokenizer_files(src: Path, config: T5Config) -> tuple[dict[str, bytes], int]:
    """The tokenizer files ``src`` has (``TOKENIZER_FILES``), to be copied into the output, and the number of extra
    ids. Each must be a regular file inside ``src`` (``file_in_folder``): a link to anywhere else would copy that
    file into the output."""
    spiece = src / "spiece.model"
    if not spiece.exists():
        raise CheckpointError(f"{src}: no spiece.model (the SentencePiece tokenizer of this T5 is required)")
    files = {
        name: read_file_bytes(file_in_folder(src, name, "tokenizer file", src), MAX_TOKENIZER_BYTES)
        for name in TOKENIZER_FILES if (src / name).exists()
    }
    extra_ids = 100
    if "tokenizer_config.json" in files:
        where = src / "tokenizer_config.json"
        extra_ids = read_json_object(where).get("extra_ids", extra_ids)
        check_value(extra_ids, int, f"{where}: extra_ids", {"min": 0, "max": config.vocab_size})
    check_vocabulary(sentencepiece_model(files["spiece.model"], spiece), extra_ids, config.vocab_size, spiece)
    return files, extra_ids


def convert_t5(
    src: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face T5 folder into an MLX T5 encoder folder; returns the output path."""
    out_dir = check_output(out_dir, dtype, overwrite, [src])
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    config, hf = read_hf_config(src)
    files = _weight_files(src)
    tokenizer_files, extra_ids = _tokenizer_files(src, config)

    state: dict[str, mx.array] = {}
    for path in files:
        for key, value in read_state_dict(path).items():
            if not _ignored(key):
                state[key] = value
    state = _normalize_keys(state, src)

    model = T5Encoder(config)
    expected = {HF_NAMES.to_checkpoint(k): v.shape for k, v in tree_flatten(model.parameters())}
    check_state_dict(expected, state, src if len(files) > 1 else files[0])
    weights = HF_NAMES.rename(state, src)
    del state

    return write_converted(
        out_dir, config, weights, model, dtype=dtype, sources=files,
        source_extra={"name_or_path": hf.get("_name_or_path", "")},
        config_extra={"tokenizer": {"extra_ids": extra_ids, "files": sorted(tokenizer_files)}},
        converter_version=CONVERTER_VERSION, q_bits=q_bits, q_group_size=q_group_size, quant_skip=QUANT_SKIP,
        extra_files=tokenizer_files, overwrite=overwrite,
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("t5", help="Hugging Face T5 folder (flan-t5-xl) -> MLX T5 encoder folder")
    p.add_argument("src", help="Hugging Face model folder (config.json, weights, spiece.model)")
    add_output_arguments(p, quantize=True)
    p.set_defaults(func=lambda a: convert_t5(a.src, a.out, a.dtype, a.q_bits, a.q_group_size, a.overwrite))
