"""Configuration: one strict dataclass base shared by every component, the flow's config built from the official
YAML, and the bounded reading of the config files that come from outside (YAML, JSON).

Every component (flow, T5, Wan VAE, SD VAE) has a config dataclass on ``Config``: the fields are listed once, each
with its type and, through ``bounded``, its allowed values (range, divisibility, choices, list length); a converted
folder's ``config.json`` holds exactly those fields plus the folder metadata (``FOLDER_KEYS``), and ``from_dict``
refuses unknown or missing fields and values of the wrong type or out of range before anything is built. A
component config also estimates its ``parameter_count`` and refuses a model far larger than any released one
(``max_parameters``), so an absurd size is an error before any weight is allocated. The component's
``model_type`` is the kind the CLI converts (``starflow-mlx convert flow|t5|wan-vae|sd-vae``). ``PipelineConfig``
(``pipeline``) is the top-level ``config.json`` of a folder holding one converted folder per part (``PIPELINE_PARTS``):
the task defaults of generating.

Config files are read by ``read_text_file`` / ``read_json_object`` / ``load_official_yaml``: bounded size, UTF-8,
one-line errors naming the file; JSON without NaN/Infinity or deep nesting; YAML without anchors or aliases and
with only plain decimal numbers and true/false recognised (see ``_OfficialYamlLoader``).

Pure Python (no MLX import) so the PyTorch reference in ``tests/reference`` shares it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

# Keys of a converted folder's config.json that describe the folder (and companion files such as the T5
# tokenizer), not the architecture.
FOLDER_KEYS = ("model_type", "dtype", "quantization", "source", "converter_version", "tokenizer", "provenance")

# Sizes of the config files we read. The released YAML files are ~1 KB and Hugging Face config.json files a few
# KB; shard indexes list one line per tensor (a few hundred KB for the largest models).
MAX_YAML_BYTES = 64 << 10
MAX_JSON_BYTES = 1 << 20
MAX_INDEX_BYTES = 4 << 20
# Tokenizer files: flan-T5's spiece.model is 0.8 MB and its tokenizer.json 2.4 MB.
MAX_TOKENIZER_BYTES = 64 << 20
MAX_JSON_DEPTH = 32  # the configs we read nest 3 levels at most
MAX_YAML_DEPTH = 16

# Size limits of the fields that hold free-form values (strings, the flow's ``extra``), so that nothing large is
# copied from a source file into config.json.
MAX_STRING = 1024
MAX_EXTRA_ENTRIES = 256
MAX_EXTRA_LIST = 64
MAX_KEY_LENGTH = 64

# Transformer layers of the STARFlow-V self-denoiser (official ``Model``: ``num_layers=8``).
DENOISER_LAYERS = 8


# ----------------------------------------------------------------------------------------------------------------
# Declared limits of a field and the checks that apply them
# ----------------------------------------------------------------------------------------------------------------


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    multiple_of: int | None = None,
    length: tuple[int, int] | None = None,
    choices: tuple | None = None,
    pattern: str | None = None,
    form: str | None = None,
) -> Any:
    """A dataclass field with its allowed values declared, checked by ``Config`` whenever a config is built.

    ``min``/``max`` (inclusive) and ``above`` (exclusive lower bound) bound a number, ``multiple_of`` an integer;
    ``choices`` and ``pattern`` (a full-match regex, described to the user by ``form``) a string; ``length`` the
    number of entries of a list or the characters of a string. For a list, the number bounds apply to each entry.
    """
    limits = {
        "min": min, "max": max, "above": above, "multiple_of": multiple_of, "length": length, "choices": choices,
        "pattern": pattern, "form": form,
    }
    metadata = {"limits": {k: v for k, v in limits.items() if v is not None}}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def shown(value: Any, width: int = 80) -> str:
    """``repr(value)`` cut to ``width`` characters: values in messages come from untrusted files."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 5]} ...{text[-1]}"


def _listed(names: typing.Iterable[str], most: int = 10) -> str:
    names = sorted(names, key=str)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown(n, 40) if not isinstance(n, str) or len(n) > 40 else n for n in names[:most]) + more


def _range_text(limits: Mapping) -> str:
    low = f"({limits['above']}" if "above" in limits else f"[{limits['min']}" if "min" in limits else "(-inf"
    high = f"{limits['max']}]" if "max" in limits else "inf)"
    return f"{low}, {high}"


def _expected(hint: Any, limits: Mapping) -> str:
    """What a field accepts, in words: 'an integer in [1, 32768]', 'one of 'L2R', 'R2L''."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_expected(a, limits) for a in options) + " (or null)"
    if origin in (list, tuple) or hint in (list, tuple):
        item_args = typing.get_args(hint)
        item = _expected(item_args[0] if item_args else Any, {k: v for k, v in limits.items() if k != "length"})
        count = f" of {limits['length'][0]} to {limits['length'][1]} entries" if "length" in limits else ""
        return f"a list{count}, each {item}"
    if "choices" in limits:
        return "one of " + ", ".join(repr(c) for c in limits["choices"])
    if hint is str:
        if "form" in limits:
            return limits["form"]
        return f"a string of at most {limits.get('length', (0, MAX_STRING))[1]} characters"
    words = {bool: "true or false", int: "an integer", float: "a finite number", dict: "a mapping"}
    text = words.get(origin or hint, "a value")
    if "multiple_of" in limits:
        text += f" multiple of {limits['multiple_of']}"
    if {"min", "max", "above"} & set(limits):
        text += f" in {_range_text(limits)}"
    return text


def check_value(value: Any, hint: Any, where: str, limits: Mapping = {}) -> Any:
    """``value`` checked against a field's type hint and declared ``limits``; tuples become lists, integers become
    floats where a float is expected. Raises a one-line ``ValueError`` naming ``where``, what is expected and the
    value."""

    def refuse():
        raise ValueError(f"{where} must be {_expected(hint, limits)}, got {shown(value)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return check_value(value, option, where, limits)
            except ValueError:
                if len(options) == 1:
                    raise
        refuse()
    if hint is Any:
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            refuse()
        if "length" in limits and not limits["length"][0] <= len(value) <= limits["length"][1]:
            refuse()
        item, item_limits = (args[0] if args else Any), {k: v for k, v in limits.items() if k != "length"}
        return [check_value(v, item, f"{where}[{i}]", item_limits) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            refuse()
        _check_plain_mapping(value, where)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            refuse()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or not _within(value, limits):
            refuse()
        if "choices" in limits and value not in limits["choices"]:
            refuse()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            refuse()
        if not _within(float(value), limits):
            refuse()
        return float(value)
    if hint is str:
        if not isinstance(value, str) or len(value) > limits.get("length", (0, MAX_STRING))[1]:
            refuse()
        if "choices" in limits and value not in limits["choices"]:
            refuse()
        if "pattern" in limits and not re.fullmatch(limits["pattern"], value):
            refuse()
        return value
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


def _within(number: int | float, limits: Mapping) -> bool:
    return not (
        ("min" in limits and number < limits["min"])
        or ("max" in limits and number > limits["max"])
        or ("above" in limits and number <= limits["above"])
        or ("multiple_of" in limits and number % limits["multiple_of"])
    )


def _is_plain_scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_STRING


def _check_plain_mapping(mapping: dict, where: str) -> None:
    """A mapping field holds a bounded number of plain values (scalars, short lists of scalars): what config.json
    can hold without copying anything large from a source file."""
    if len(mapping) > MAX_EXTRA_ENTRIES:
        raise ValueError(f"{where} has {len(mapping)} entries, more than the {MAX_EXTRA_ENTRIES} allowed")
    for key, value in mapping.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"{where}: key {shown(key)} must be a string of at most {MAX_KEY_LENGTH} characters")
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_EXTRA_LIST or not all(_is_plain_scalar(v) for v in items):
            raise ValueError(
                f"{where}[{key!r}] must be a number, string, boolean or null (or a list of at most {MAX_EXTRA_LIST}), "
                f"got {shown(value)}"
            )


@functools.lru_cache(maxsize=None)
def _field_specs(cls: type) -> dict[str, tuple[Any, Mapping]]:
    """Field name -> (type hint, declared limits) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("limits", {})) for f in dataclasses.fields(cls)}


class Config:
    """Base of every settings dataclass: the component configs (with a ``model_type``, stored in folders) and the
    sampler's options. Fields are checked when built (type hint and ``bounded`` limits), ``validate`` checks the
    relations between fields, ``parameter_count`` bounds the size of the model; ``from_dict`` is strict.

    Not a dataclass itself, so that frozen dataclasses (``SamplerOptions``, ``Jacobi``) can build on it too.
    """

    model_type: ClassVar[str] = ""
    # Keys of a stored config that are not fields, skipped by from_dict: a converted folder's metadata.
    metadata_keys: ClassVar[tuple[str, ...]] = FOLDER_KEYS
    # Refuse configs whose parameter_count exceeds this (about 10x the largest released model of the kind).
    max_parameters: ClassVar[int | None] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = self.check_field(f.name, getattr(self, f.name), f"{type(self).__name__}.{f.name}")
            object.__setattr__(self, f.name, value)  # object's: frozen subclasses too
        self.validate()
        self._check_parameter_count()

    @classmethod
    def check_field(cls, name: str, value: Any, where: str) -> Any:
        """``value`` checked as field ``name`` would be (type and declared limits); errors name ``where``."""
        hint, limits = _field_specs(cls)[name]
        return check_value(value, hint, where, limits)

    def validate(self) -> None:
        """Relations between fields; raise ``ValueError`` naming the fields and the values."""

    def parameter_count(self) -> int | None:
        """Number of weights of the model this config builds (None where it builds none)."""
        return None

    def _check_parameter_count(self) -> None:
        count = self.parameter_count()
        if count is not None and self.max_parameters is not None and count > self.max_parameters:
            raise ValueError(
                f"{type(self).__name__} describes a model of {count:,} parameters ({count * 4 / 1e9:,.1f} GB in "
                f"float32), over the limit of {self.max_parameters:,} (about 10x the largest released model)"
            )

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """The config of a converted folder: unknown or missing fields are errors; the folder metadata
        (``metadata_keys``) is not a field, and its blocks that loading uses are checked too."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping of {cls.model_type} config fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - set(cls.metadata_keys)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.model_type} config field(s): {_listed(unknown)}")
        if cls.metadata_keys == FOLDER_KEYS:
            check_folder_keys(d, source)
        required = [
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d
        ]
        if required:
            raise ValueError(f"{source}: missing {cls.model_type} config field(s): {', '.join(required)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The fields, JSON-ready, preceded by ``model_type``: what a converted folder's config.json holds."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}


@dataclass
class Quantization(Config):
    """The ``quantization`` block of a quantized folder's config.json (MLX affine, the mlx-lm convention)."""

    model_type: ClassVar[str] = "quantization"
    metadata_keys: ClassVar[tuple[str, ...]] = ()

    group_size: int = bounded(choices=(32, 64, 128))
    bits: int = bounded(choices=(2, 3, 4, 5, 6, 8))


@dataclass
class TokenizerFiles(Config):
    """The ``tokenizer`` block of a T5 folder's config.json: the tokenizer files copied beside the weights."""

    model_type: ClassVar[str] = "tokenizer"
    metadata_keys: ClassVar[tuple[str, ...]] = ()

    extra_ids: int = bounded(100, min=0, max=1 << 22)
    files: list[str] = bounded(default_factory=list, length=(0, 16), pattern=r"[\w.-]{1,128}", form="a file name")


def check_folder_keys(d: dict, source: str) -> None:
    """The folder metadata of a converted folder's config.json that loading uses: the quantization and tokenizer
    blocks (the others are informational)."""
    for key, block in (("quantization", Quantization), ("tokenizer", TokenizerFiles)):
        if d.get(key) is not None:
            block.from_dict(d[key], f"{source}: {key}")


# ----------------------------------------------------------------------------------------------------------------
# Reading config files from outside: bounded, UTF-8, one-line errors
# ----------------------------------------------------------------------------------------------------------------


def read_file_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; every problem is a one-line ``ValueError``."""
    path = Path(path)
    try:
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
        if is_file:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    if not is_file:
        problem = "is a folder, expected a file" if is_dir else "not a regular file" if exists else "no such file"
        raise ValueError(f"{path}: {problem}")
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than the {max_bytes:,}-byte limit for this kind of file")
    return data


def read_text_file(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; every problem is a one-line ``ValueError``."""
    data = read_file_bytes(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NonFinite(f"{name} is not allowed (only finite numbers)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"{text} is not a finite number")
    return value


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON file holding one object: bounded size and nesting, finite numbers only (Python's json would accept
    NaN, Infinity and 1e999); every problem is a one-line ``ValueError`` naming the file."""
    return parse_json_object(read_text_file(path, max_bytes), path)


def parse_json_object(text: str, path: str | os.PathLike) -> dict:
    """``read_json_object`` for text already read (bounded by the caller) from ``path``, e.g. a media file's tag."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except _NonFinite as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, got a {type(value).__name__}")
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    level = [value]
    for _ in range(limit):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())]
        if not level:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# The flow
# ----------------------------------------------------------------------------------------------------------------

# Upper bounds of the flow's sizes: about 10x STARFlow-V 7B (3072 / 4096 wide, 6 blocks of up to 24 layers, 48
# latent channels, 256 text tokens, a 40x40 latent grid from 640-pixel frames, flan-T5-XL/XXL text widths).
MAX_WIDTH = 32768
MAX_BLOCKS = 64
MAX_LAYERS = 256
MAX_FLOW_PARAMETERS = 70_000_000_000  # STARFlow-V: 6,890,096,528 with its denoiser

# Spatial downsampling of the latent spaces the official configs name (spec §2): the YAML's img_size is in pixels.
VAE_DOWNSAMPLE = {"sd-vae": 8, "sdxl-vae": 8, "wan2.2": 16, "none": 1}
# Hidden width of the text encoders the official configs name.
TEXT_WIDTH = {"google/flan-t5-xl": 2048, "t5xl": 2048, "google/flan-t5-xxl": 4096, "t5xxl": 4096}


@dataclass
class FlowConfig(Config):
    """Architecture and sampling fields of a STARFlow / STARFlow-V flow (official names where they exist)."""

    model_type: ClassVar[str] = "flow"
    max_parameters: ClassVar[int] = MAX_FLOW_PARAMETERS

    in_channels: int = bounded(min=1, max=1024)  # latent channels (official channel_size)
    img_size: int = bounded(min=1, max=1024)  # latent grid size (official img_size // VAE downsample)
    channels: int = bounded(min=1, max=MAX_WIDTH)
    layers_per_block: list[int] = bounded(min=1, max=MAX_LAYERS, length=(1, MAX_BLOCKS))
    txt_size: int = bounded(min=1, max=4096)  # text tokens; every supported flow is text-conditioned
    txt_dim: int = bounded(min=1, max=MAX_WIDTH)
    patch_size: int = bounded(1, min=1, max=64)
    top_block_channels: int | None = bounded(None, min=1, max=MAX_WIDTH)
    # RoPE splits each head into 3 axes: half of head_dim must be >= 8 and even
    head_dim: int = bounded(64, min=16, max=1024, multiple_of=4)
    num_heads: int | None = bounded(None, min=1, max=MAX_WIDTH // 16)
    pt_seq_len: int | None = bounded(None, min=1, max=4096)
    cond_top_only: bool = True
    use_softplus: bool = True
    use_final_norm: bool = True
    soft_clip: float = bounded(0.0, min=0, max=1000)  # 0: no soft clip
    seq_order: str = bounded("L2R", choices=("L2R", "R2L"))
    temporal_causal: int = bounded(0, min=0, max=64)
    shallow_block_local: bool = False
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    denoiser_window: int | None = bounded(None, min=1, max=1024)
    local_attn_window: int | None = bounded(None, min=1, max=1024)  # latent frames
    # training / sampling fields that the pipeline needs
    noise_std: float = bounded(0.3, above=0, max=100)
    cond_noise_level: bool = False
    cfg: float = bounded(0.0, min=0, max=100)
    vae: str = bounded("none", length=(0, 256))
    text: str = bounded("none", length=(0, 256))
    # frames:fps (official train.py: "num_frames:fps1:fps2"); None for image models
    vid_size: str | None = bounded(None, pattern=r"[0-9]{1,6}(:[0-9]{1,6}){1,2}", form="'frames:fps' such as '81:16'")
    fps_cond: bool = False
    mix_aspect: bool = False
    pixel_size: int | None = bounded(None, min=1, max=16384)  # the YAML's img_size, before the VAE downsample
    extra: dict[str, Any] = field(default_factory=dict)  # other official fields, kept for the record

    def validate(self) -> None:
        if self.pt_seq_len is None:
            self.pt_seq_len = self.img_size // self.patch_size
        if self.temporal_causal and self.seq_order != "L2R":
            raise ValueError("temporal_causal requires seq_order 'L2R'")
        if not self.cond_top_only:
            # every released model conditions the deep block only; text (and guidance) in the shallow blocks
            # would need paths nothing can be checked against
            raise ValueError("cond_top_only=0 (text in the shallow blocks) is not supported")
        if self.num_heads is not None and self.num_heads * self.head_dim != self.channels:
            raise ValueError(
                f"num_heads {self.num_heads} x head_dim {self.head_dim} must equal channels {self.channels}"
            )
        for name in ("channels", "top_block_channels"):
            width = getattr(self, name)
            if width is not None and width % self.head_dim:
                raise ValueError(f"{name} {width} is not a multiple of head_dim {self.head_dim}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    def parameter_count(self) -> int:
        """Weights of ``StarFlow(self)``: every MetaBlock, and the denoiser when the flow has one."""
        cin = self.patch_channels
        final_norm = self.use_final_norm

        def stack(width: int, layers: int, txt_dim: int, out: int) -> int:
            # proj_in, proj_txt, transformer layers (attention 4w² + 6w, MLP 8w² + 7w), final norm, proj_out
            return (
                (cin + 1) * width
                + ((txt_dim + 1) * width if txt_dim else 0)
                + layers * (12 * width * width + 13 * width)
                + (width if final_norm else 0)
                + (width + 1) * out
            )

        *shallow, deep = self.layers_per_block
        total = sum(cin + stack(self.channels, n, 0, 2 * cin) for n in shallow)
        total += cin + stack(self.top_channels, deep, self.txt_dim, 2 * cin)
        if self.learnable_self_denoiser:
            total += stack(self.channels, DENOISER_LAYERS, self.txt_dim if self.conditional_denoiser else 0, cin)
        return total

    # ---- derived sizes ----
    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def top_channels(self) -> int:
        return self.top_block_channels or self.channels

    @property
    def patch_channels(self) -> int:
        return self.in_channels * self.patch_size**2

    def block_permutation(self, i: int) -> str:
        """'identity' or 'flip' for block i (spec §4.2); 'flip' is in-frame for video when temporal_causal."""
        n = self.num_blocks
        if i == n - 1:
            index = (n - 1) % 2 if self.seq_order == "R2L" else n % 2
        else:
            index = i % 2 if self.seq_order == "R2L" else (i + 1) % 2
        return "identity" if index == 0 else "flip"

    @property
    def is_video(self) -> bool:
        return self.vid_size is not None or bool(self.temporal_causal)


# ----------------------------------------------------------------------------------------------------------------
# The official YAML form: ``arguments:`` followed by a list of one-key mappings (train.get_tarflow_parser names)
# ----------------------------------------------------------------------------------------------------------------


def _yaml_loader():
    """A safe YAML loader for untrusted configs (built on first use: PyYAML is imported only to read YAML).

    - Anchors and aliases are refused, so a few hundred bytes cannot expand into gigabytes (an "alias bomb");
      explicit tags (``!!python/...``, ``!!binary``, ``!!int``) are refused; nesting is bounded.
    - Only plain decimal integers (``64``, ``-1``), decimal floats (``0.5``, ``5e-5``, ``.nan`` which the field
      checks then refuse), ``true``/``false`` and ``null``/``~`` are recognised. Everything else YAML 1.1 would
      convert silently stays a string: ``3:16`` (base-60 integer 196), ``0x10``, ``010`` (octal 8), ``1_000``,
      ``yes``/``no``/``on``/``off``, dates. So an unquoted ``vid_size: 3:16`` means '3:16', and ``channels: 0x40``
      or ``fps_cond: yes`` are refused by the field checks instead of read as something else.
    """
    import yaml

    class OfficialYamlLoader(yaml.SafeLoader):
        yaml_implicit_resolvers: dict = {}

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise yaml.composer.ComposerError(
                    None, None, "anchors and aliases (& and *) are not allowed in a config", event.start_mark
                )
            if getattr(event, "tag", None) is not None:
                raise yaml.composer.ComposerError(
                    None, None, f"explicit tags ({event.tag}) are not allowed in a config", event.start_mark
                )
            self.depth = getattr(self, "depth", 0) + 1
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    digits = list("-+0123456789")
    decimal = r"([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+"
    resolvers = [
        ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
        ("int", r"[-+]?(0|[1-9][0-9]*)", digits),
        ("float", rf"[-+]?({decimal}|\.(inf|Inf|INF|nan|NaN|NAN))", digits + ["."]),
        ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ]
    for tag, regex, first in resolvers:
        OfficialYamlLoader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{regex})$"), first)
    return OfficialYamlLoader


def _yaml_error_text(error) -> str:
    """A PyYAML error on one line: what went wrong and where."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    words = " ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
    words = words or str(error).splitlines()[0]
    return f"{words} (line {mark.line + 1}, column {mark.column + 1})" if mark else words


def load_official_yaml(path: str | Path, txt_dim: int | None = None) -> FlowConfig:
    """The FlowConfig of an official YAML file (``configs/*.yaml`` of the STARFlow release)."""
    import yaml

    text = read_text_file(path, MAX_YAML_BYTES)
    try:
        raw = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {_yaml_error_text(e)}") from None
    return config_from_official(official_args(raw, str(path)), str(path), txt_dim)


def official_args(raw: Any, source: str) -> dict:
    """Flatten the official YAML structure into a plain dict of argument values; a name given twice is an error."""
    if isinstance(raw, dict) and "arguments" in raw:
        raw = raw["arguments"]
    if isinstance(raw, dict):
        raw = [{k: v} for k, v in raw.items()]
    if not isinstance(raw, list):
        raise ValueError(f"{source}: not an official STARFlow config (expected an 'arguments:' list)")
    if len(raw) > MAX_EXTRA_ENTRIES:
        raise ValueError(f"{source}: {len(raw)} arguments, more than the {MAX_EXTRA_ENTRIES} allowed")
    out = {}
    for item in raw:
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"{source}: each entry under 'arguments' must be one 'name: value', got {shown(item)}")
        (name, value), = item.items()
        if not isinstance(name, str):
            raise ValueError(f"{source}: argument name {shown(name)} is not a string")
        if name in out:
            raise ValueError(f"{source}: argument {name!r} is given twice")
        out[name] = value
    return out


# Official fields with no effect on the model or that we do not support; refused when set to anything but these.
_UNSUPPORTED = {
    "use_swiglu": 0,
    "use_qk_norm": 0,
    "use_post_norm": 0,
    "use_bias": 1,
    "norm_type": "layer_norm",
    "use_pretrained_lm": None,
    "use_mm_attn": 0,
    "num_kv_heads": None,
    "noise_embed_denoiser": 0,
    "model_type": None,
}
_REQUIRED_OFFICIAL = ("img_size", "channel_size", "channels", "layers_per_block", "txt_size")
# Flags whose parser default (0) we do not support: they must be given as 1.
_REQUIRED_ON = ("rope", "sos")
# Official names of FlowConfig fields where they differ from ours.
_RENAMED = {"channel_size": "in_channels", "img_size": "pixel_size"}
# FlowConfig fields that no official field sets directly (derived, or ours).
_DERIVED = {"img_size", "in_channels", "txt_dim", "pixel_size", "extra", "layers_per_block", "cfg"}
# train.get_tarflow_parser defaults of the official fields we read, where they differ from FlowConfig's.
_OFFICIAL_DEFAULTS = {
    "blocks": 4, "patch_size": 4, "seq_order": "R2L", "cond_top_only": False, "use_softplus": False,
    "use_final_norm": False, "noise_std": 0.3, "cfg": 0.0,
}
_INTEGER = re.compile(r"[-+]?[0-9]{1,9}")


def _official_fields() -> dict[str, str]:
    """Official name -> FlowConfig field for every official field that maps onto one."""
    names = {f.name for f in dataclasses.fields(FlowConfig)} - _DERIVED
    return {**{n: n for n in names}, **_RENAMED}


def _official_flag(value: Any, where: str) -> bool:
    """An official 0/1 flag: 0, 1, true or false (the parser's type=int would turn anything else into an error or
    a silent truth value)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{where} must be 0 or 1 (or true/false), got {shown(value)}")


def _not_optional(hint: Any) -> Any:
    """``X`` for ``X | None``; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _official_value(name: str, value: Any, source: str) -> Any:
    """One official field as the FlowConfig field it sets, checked against that field's type and limits; errors
    name the official field. Flags are 0/1, ``null``/'none' leaves an optional field unset."""
    ours = _official_fields()[name]
    where = f"{source}: {name}"
    hint, limits = _field_specs(FlowConfig)[ours]
    if hint is bool:
        return _official_flag(value, where)
    if ours in ("vae", "text") and value is None:
        return "none"
    if name in _REQUIRED_OFFICIAL:  # never unset, even where the FlowConfig field may be (pixel_size)
        hint = _not_optional(hint)
    elif value in ("none", "None") and type(None) in typing.get_args(hint):
        value = None
    return check_value(value, hint, where, limits)


def _layers_per_block(args: dict, source: str) -> list[int]:
    """layers_per_block as the official parser reads it (nargs='*': a number or space-separated numbers; a YAML
    list is accepted too), one entry broadcast to ``blocks`` blocks."""
    raw, where = args["layers_per_block"], f"{source}: layers_per_block"
    if isinstance(raw, str):
        words = raw.split()
        if not all(_INTEGER.fullmatch(w) for w in words):
            raise ValueError(f"{where} must be integers separated by spaces, got {shown(raw)}")
        raw = [int(w) for w in words]
    elif isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    layers = FlowConfig.check_field("layers_per_block", raw, where)
    blocks = args.get("blocks", _OFFICIAL_DEFAULTS["blocks"])
    check_value(blocks, int, f"{source}: blocks", {"min": 1, "max": MAX_BLOCKS})
    if len(layers) == 1:
        return layers * blocks
    if "blocks" in args and len(layers) != blocks:
        raise ValueError(f"{where} has {len(layers)} entries but blocks is {blocks}")
    return layers


def _guidance(args: dict, source: str) -> float:
    """The config's cfg. The official parser reads it as a list (nargs='+'; space-separated in the YAML, which
    sample.py's own --cfg overrides anyway): every entry is checked and the first is the model's default."""
    raw, where = args.get("cfg", _OFFICIAL_DEFAULTS["cfg"]), f"{source}: cfg"
    if isinstance(raw, str):
        try:
            raw = [float(w) for w in raw.split()]
        except ValueError:
            raise ValueError(f"{where} must be a number or numbers separated by spaces, got {shown(raw)}") from None
    values = raw if isinstance(raw, list) else [raw]
    if not 1 <= len(values) <= MAX_EXTRA_LIST:
        raise ValueError(f"{where} must be a number or a list of 1 to {MAX_EXTRA_LIST} numbers, got {shown(raw)}")
    return [FlowConfig.check_field("cfg", v, where) for v in values][0]


def _vae_downsample(vae: str) -> int:
    name = vae.lower()
    for key, factor in VAE_DOWNSAMPLE.items():
        if key in name:
            return factor
    raise ValueError(f"unknown VAE {vae!r}: cannot derive the latent size (known: sd-vae, sdxl-vae, Wan2.2, none)")


def _text_width(text: str, override: int | None) -> int:
    if override is not None:
        return override
    if text in TEXT_WIDTH:
        return TEXT_WIDTH[text]
    tiny = re.fullmatch(r"tiny-([0-9]{1,6})", text)  # the test fixtures' stand-in encoders
    if tiny:
        return int(tiny[1])
    raise ValueError(f"unknown text encoder {text!r}: pass the text width explicitly (--txt-dim)")


def _check_supported(args: dict, source: str) -> None:
    for key, allowed in _UNSUPPORTED.items():
        if key in args and args[key] != allowed and not (allowed is None and args[key] in ("", "none", "None")):
            raise ValueError(f"{source}: {key}={shown(args[key])} is not supported (only {allowed!r})")
    for key in _REQUIRED_ON:
        if not _official_flag(args.get(key, 0), f"{source}: {key}"):
            raise ValueError(f"{source}: {key}=0 is not supported (only 1)")


def config_from_official(args: dict, source: str = "config", txt_dim: int | None = None) -> FlowConfig:
    """Map official training arguments (spec §2) to a FlowConfig, with the parser's defaults for absent fields.

    Every field the model uses is checked strictly against the FlowConfig field it sets (``channels: 64.9`` or
    ``soft_clip: .nan`` are errors, not truncated or kept); the others are kept in ``extra`` when they are small
    plain values.
    """
    missing = [k for k in _REQUIRED_OFFICIAL if k not in args]
    if missing:
        raise ValueError(f"{source}: missing required field(s): {', '.join(missing)}")
    _check_supported(args, source)
    official = _official_fields()
    values = {ours: _OFFICIAL_DEFAULTS[name] for name, ours in official.items() if name in _OFFICIAL_DEFAULTS}
    values.update({official[name]: _official_value(name, v, source) for name, v in args.items() if name in official})
    used = set(official) | {"layers_per_block", "blocks", "cfg", *_UNSUPPORTED, *_REQUIRED_ON}
    pixel_size = values["pixel_size"]
    try:
        factor = _vae_downsample(values.get("vae", "none"))
        if pixel_size % factor:
            raise ValueError(f"img_size {pixel_size} is not a multiple of the VAE downsample {factor}")
        return FlowConfig(
            **values,
            img_size=pixel_size // factor,
            layers_per_block=_layers_per_block(args, source),
            txt_dim=_text_width(values.get("text", "none"), txt_dim),
            cfg=_guidance(args, source),
            extra={k: v for k, v in args.items() if k not in used},
        )
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(f"{source}:") else f"{source}: {message}") from None


GAUSSIAN_LOG_NORM = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline folder: flow/, text/ and vae/ (each a converted folder) under a config.json of task defaults
# ----------------------------------------------------------------------------------------------------------------

# The subfolders of a pipeline folder and the model_type each may have: the one place that names them.
PIPELINE_PARTS = {"flow": ("flow",), "text": ("t5",), "vae": ("wan-vae", "sd-vae")}
# The VAE each task decodes with: STARFlow-V's Wan2.2 VAE, STARFlow's SD VAE.
TASK_VAE = {"t2v": "wan-vae", "t2i": "sd-vae"}
# sample.py's --aspect_ratio choices ("random" aside), width:height.
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")
# Pixel frames of a clip: the README's longest example is 481 (~30 s at 16 fps); long videos go past training.
MAX_FRAMES = 1 << 16


@dataclass
class PipelineConfig(Config):
    """The task defaults of a pipeline folder, its top-level ``config.json``: what generating uses where the caller
    does not choose. Each default is the released one, cited beside it (official ``sample.py`` flags and the
    ``scripts/test_sample_{video,image}.sh`` that run it, and the YAML); the field defaults are STARFlow-V's,
    ``for_flow`` gives a flow's own (the frames and fps of its ``vid_size``, its aspect ratios, T2I's settings).

    Frames and fps are pixel-space (81 frames at 16 fps are 21 latent frames); ``context_length`` is in latent
    frames. ``target_noise_std`` None means the flow's own ``noise_std``.
    """

    model_type: ClassVar[str] = "pipeline"

    task: str = bounded("t2v", choices=tuple(TASK_VAE))
    # YAML vid_size "81:16"; an image is one frame at 0 fps (sample.py: --target_length 1 sets out_fps 0)
    frames: int = bounded(81, min=1, max=MAX_FRAMES)
    fps: int = bounded(16, min=0, max=240)  # test_sample_video.sh --out_fps 16, the vid_size fps
    aspect_ratio: str = bounded("16:9", choices=ASPECT_RATIOS)  # test_sample_video.sh; images: "1:1"
    # sample.py honours --aspect_ratio only for a model trained with mix_aspect; the others are square
    aspect_ratios: list[str] = bounded(
        default_factory=lambda: list(ASPECT_RATIOS), choices=ASPECT_RATIOS, length=(1, len(ASPECT_RATIOS))
    )
    guidance: float = bounded(3.5, min=0, max=100)  # --cfg 3.5 (test_sample_video.sh), 3.6 (test_sample_image.sh)
    jacobi: bool = True  # --jacobi 1 in both scripts (sample.py's default 0 is the sequential inverse)
    jacobi_block_size: int = bounded(32, min=1, max=65536)  # --jacobi_block_size 32 (video script), 16 (image)
    jacobi_threshold: float = bounded(0.001, min=0, max=1)  # --jacobi_th 0.001 in both scripts
    jacobi_max_iter: int = bounded(32, min=1, max=1024)  # sample.py --jacobi_max_iter default
    # sample.py's process_denoising runs with --finetuned_vae none, which both scripts pass
    denoise: bool = True
    # the flow's learnable self-denoiser (--disable_learnable_denoiser 0); off: the gradient step of T2I
    learnable_denoiser: bool = True
    denoise_step_size: float = bounded(1.0, above=0, max=100)  # --self_denoising_lr default 1 (the gradient step)
    target_noise_std: float | None = bounded(None, above=0, max=100)  # --target_noise_std default None
    context_length: int = bounded(16, min=0, max=1024)  # --context_length default 16 (latent frames, long videos)
    attention_temperature: float = bounded(1.0, above=0, max=100)  # --attn_temp default 1

    def validate(self) -> None:
        if self.aspect_ratio not in self.aspect_ratios:
            raise ValueError(f"aspect_ratio {self.aspect_ratio!r} is not one of aspect_ratios {self.aspect_ratios}")
        if len(set(self.aspect_ratios)) != len(self.aspect_ratios):
            raise ValueError(f"aspect_ratios {self.aspect_ratios} lists a ratio twice")
        if self.task == "t2i" and (self.frames, self.fps) != (1, 0):
            raise ValueError(f"a t2i pipeline makes one frame at fps 0, got frames {self.frames}, fps {self.fps}")
        if self.task == "t2v" and self.fps < 1:
            raise ValueError(f"a t2v pipeline needs fps >= 1, got {self.fps}")

    @classmethod
    def for_flow(cls, flow: FlowConfig) -> "PipelineConfig":
        """The released defaults for ``flow``: STARFlow-V's settings with the frames and fps of its ``vid_size``
        for a video flow, STARFlow's (one square frame, --cfg 3.6, --jacobi_block_size 16, the gradient
        denoising step) for an image flow; the aspect-ratio buckets when it was trained with ``mix_aspect``."""
        ratios = list(ASPECT_RATIOS) if flow.mix_aspect else ["1:1"]
        if not flow.is_video:
            return cls(
                task="t2i", frames=1, fps=0, aspect_ratio="1:1", aspect_ratios=ratios, guidance=3.6,
                jacobi_block_size=16, learnable_denoiser=False,
            )
        if flow.vid_size is None:
            raise ValueError("the flow is a video model without vid_size: its frames and fps are unknown")
        frames, fps = (int(n) for n in flow.vid_size.split(":")[:2])
        return cls(
            task="t2v", frames=frames, fps=fps, aspect_ratio="16:9" if flow.mix_aspect else "1:1",
            aspect_ratios=ratios, learnable_denoiser=flow.learnable_self_denoiser,
        )
