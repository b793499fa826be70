"""Hugging Face T5 folder (flan-T5-XL) -> MLX T5 encoder folder.

Accepted sources: a folder with ``config.json`` and ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded ``pytorch_model-*.bin`` with its index, written
by ``T5ForConditionalGeneration`` / ``T5EncoderModel`` (keys ``encoder.*`` plus ``shared.weight``) or a bare
``T5Stack`` state dict (keys ``block.*``, ``embed_tokens.weight``). Only the encoder is kept: ``decoder.*`` and
``lm_head.*`` are ignored and, where an index says a shard holds nothing else, that shard is never read. Pickled
checkpoints go through ``read_state_dict`` (weights only; nothing in the pickle is executed).

Names change (Hugging Face -> ours):
``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`` -> ``layers.{i}.attention.{q,k,v,o}``,
``encoder.block.{i}.layer.0.layer_norm`` -> ``layers.{i}.attention_norm``,
``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo}`` -> ``layers.{i}.ffn.{...}``,
``encoder.block.{i}.layer.1.layer_norm`` -> ``layers.{i}.ffn_norm``,
``encoder.block.0.layer.0.SelfAttention.relative_attention_bias`` -> ``relative_attention_bias``,
``encoder.embed_tokens`` (or the tied ``shared``) -> ``embed_tokens``, ``encoder.final_layer_norm`` unchanged.
Linear weights keep their [out, in] layout. The tokenizer (``spiece.model``, and ``tokenizer.json`` /
``tokenizer_config.json`` / ``special_tokens_map.json`` when present) is copied next to the weights.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from starflow_mlx.t5 import T5Config, T5Encoder
from starflow_mlx.weights import (
    CheckpointError,
    check_state_dict,
    parse_dtype,
    quantize_model,
    read_state_dict,
    provenance,
    write_model_folder,
)

CONVERTER_VERSION = "1"
log = logging.getLogger(__name__)

# Kept in full precision when quantizing: the embedding is a lookup table (quantizing it would only save memory
# at the cost of every token's vector) and the relative bias is tiny.
QUANT_SKIP = ("embed_tokens", "relative_attention_bias")

TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Hugging Face T5Config defaults for the optional fields (its feed_forward_proj default is "relu", the original T5).
_HF_OPTIONAL = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
_HF_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")

# (Hugging Face name, our name); {i} is a layer index, {w} an attention projection, {f} a feed-forward matrix.
_NAMES = [
    ("encoder.block.{i}.layer.0.SelfAttention.{w}.weight", "layers.{i}.attention.{w}.weight"),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "layers.{i}.attention_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.{f}.weight", "layers.{i}.ffn.{f}.weight"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_attention_bias.weight"),
    ("encoder.embed_tokens.weight", "embed_tokens.weight"),
    ("encoder.final_layer_norm.weight", "final_layer_norm.weight"),
]
_FIELDS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>[qkvo])", "f": r"(?P<f>wi_0|wi_1|wi|wo)"}


def _compile(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, group in _FIELDS.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile(f"^{regex}$")


_PATTERNS = [(_compile(hf), _compile(ours)) for hf, ours in _NAMES]


def _rename(key: str, source: int) -> str:
    """``source`` 0: Hugging Face -> ours; 1: ours -> Hugging Face."""
    for patterns, names in zip(_PATTERNS, _NAMES):
        match = patterns[source].match(key)
        if match:
            return names[1 - source].format(**match.groupdict())
    return key


def to_mlx_name(hf_key: str) -> str:
    return _rename(hf_key, 0)


def to_hf_name(key: str) -> str:
    return _rename(key, 1)


def _ignored(key: str) -> bool:
    """Keys of a full T5 that the encoder never reads."""
    return key.startswith(("decoder.", "lm_head."))


def read_hf_config(src: Path) -> tuple[T5Config, dict]:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; expected a Hugging Face T5 model folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    model_type = hf.get("model_type", "t5")
    if model_type == "umt5":
        raise CheckpointError(f"{path}: model_type 'umt5' has a relative bias per layer; only T5 / mT5 are supported")
    if model_type not in ("t5", "mt5"):
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a T5 model (expected 't5' or 'mt5')")
    missing = [k for k in _HF_REQUIRED if k not in hf]
    if missing:
        raise CheckpointError(f"{path}: missing T5 config field(s) {', '.join(missing)}")
    fields = {k: hf[k] for k in _HF_REQUIRED}
    fields.update({k: hf.get(k, default) for k, default in _HF_OPTIONAL.items()})
    try:
        config = T5Config(**fields)
    except (TypeError, ValueError) as e:
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index: {e}") from None
            needed = sorted({name for key, name in weight_map.items() if not _ignored(key)})
            if not needed:
                raise CheckpointError(f"{index}: lists no encoder weights")
            return [src / name for name in needed]
        if (src / single).is_file():
            return [src / single]
    raise CheckpointError(
        f"{src}: no weights found (looked for model.safetensors[.index.json] and pytorch_model.bin[.index.json])"
    )


def _normalize_keys(state: dict[str, mx.array]) -> dict[str, mx.array]:
    """Bring every key into the ``encoder.*`` namespace and resolve the tied embedding."""
    out = {}
    for key, value in state.items():
        if _ignored(key):
            continue
        if key == "shared.weight" or key.startswith("encoder."):
            out[key] = value
        else:  # a bare T5Stack state dict
            out["encoder." + key] = value
    shared = out.pop("shared.weight", None)
    if "encoder.embed_tokens.weight" not in out and shared is not None:
        out["encoder.embed_tokens.weight"] = shared
    return out


def _tokenizer_files(src: Path, config: T5Config) -> tuple[dict[str, bytes], int]:
    spiece = src / "spiece.model"
    if not spiece.is_file():
        raise CheckpointError(f"{src}: no spiece.model (the SentencePiece tokenizer of this T5 is required)")
    files = {name: (src / name).read_bytes() for name in TOKENIZER_FILES if (src / name).is_file()}
    extra_ids = 100
    if "tokenizer_config.json" in files:
        try:
            extra_ids = int(json.loads(files["tokenizer_config.json"]).get("extra_ids", 100))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{src / 'tokenizer_config.json'}: unreadable: {e}") from None
    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_proto=files["spiece.model"]).get_piece_size()
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own message
        raise CheckpointError(f"{spiece}: not a readable SentencePiece model: {e}") from None
    if pieces + extra_ids > config.vocab_size:
        raise CheckpointError(
            f"{spiece}: {pieces} pieces + {extra_ids} extra ids exceed the model's vocab_size {config.vocab_size}; "
            "is this the tokenizer of this model?"
        )
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
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite / --overwrite to replace it)")
    target_dtype = parse_dtype(dtype)
    config, hf = read_hf_config(src)
    tokenizer_files, extra_ids = _tokenizer_files(src, config)

    files = _weight_files(src)
    state: dict[str, mx.array] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{src}: the shard index names {path.name}, which is missing")
        for key, value in read_state_dict(path).items():
            if not _ignored(key):
                state[key] = value
    state = _normalize_keys(state)

    model = T5Encoder(config)
    expected = {to_hf_name(k): v.shape for k, v in tree_flatten(model.parameters())}
    check_state_dict(expected, state, src if len(files) > 1 else files[0])
    weights = {to_mlx_name(k): v.astype(target_dtype) for k, v in state.items()}
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
        "tokenizer": {"extra_ids": extra_ids, "files": sorted(tokenizer_files)},
        "source": provenance(files, name_or_path=hf.get("_name_or_path", "")),
        "converter_version": CONVERTER_VERSION,
    }
    if quantization:
        folder_config["quantization"] = quantization
    out = write_model_folder(out_dir, folder_config, weights, overwrite=overwrite, extra_files=tokenizer_files)
    log.info("wrote %s (%d tensors, %s%s)", out, len(weights), dtype, f", {q_bits}-bit" if q_bits else "")
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("t5", help="Hugging Face T5 folder (flan-t5-xl) -> MLX T5 encoder folder")
    p.add_argument("src", help="Hugging Face model folder (config.json, weights, spiece.model)")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=None, help="quantize Linear layers (MLX affine)")
    p.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=lambda a: convert_t5(a.src, a.out, a.dtype, a.q_bits, a.q_group_size, a.overwrite))
