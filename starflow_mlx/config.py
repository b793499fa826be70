"""Configuration: one strict dataclass base shared by every component, and the flow's config built from the
official YAML.

Every component (flow, T5, Wan VAE, SD VAE) has a config dataclass on ``Config``: the fields are listed once, a
converted folder's ``config.json`` holds exactly those fields plus the folder metadata (``FOLDER_KEYS``), and
``from_dict`` refuses unknown or missing fields and values of the wrong type before anything is built. The
component's ``model_type`` is the kind the CLI converts (``starflow-mlx convert flow|t5|wan-vae|sd-vae``).

Pure Python (no MLX import) so the PyTorch reference in ``tests/reference`` shares it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Keys of a converted folder's config.json that describe the folder (and companion files such as the T5
# tokenizer), not the architecture.
FOLDER_KEYS = ("model_type", "dtype", "quantization", "source", "converter_version", "tokenizer")


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field's type hint; tuples become lists, ints become floats where a float is
    expected. Raises ``ValueError`` naming the field and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if hint is Any:
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


class Config:
    """Base of every settings dataclass: the component configs (with a ``model_type``, stored in folders) and the
    sampler's options. Fields are type-checked when built, ``validate`` checks ranges, ``from_dict`` is strict.

    Not a dataclass itself, so that frozen dataclasses (``SamplerOptions``, ``Jacobi``) can build on it too.
    """

    model_type: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_value(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
            object.__setattr__(self, f.name, value)  # object's: frozen subclasses too
        self.validate()

    def validate(self) -> None:
        """Ranges and relations between fields; raise ``ValueError`` naming the field and the value."""

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """The config of a converted folder (metadata keys ignored): unknown or missing fields are errors."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping of {cls.model_type} config fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(FOLDER_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown {cls.model_type} config field(s): {', '.join(unknown)}")
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


# Spatial downsampling of the latent spaces the official configs name (spec §2): the YAML's img_size is in pixels.
VAE_DOWNSAMPLE = {"sd-vae": 8, "sdxl-vae": 8, "wan2.2": 16, "none": 1}
# Hidden width of the text encoders the official configs name.
TEXT_WIDTH = {"google/flan-t5-xl": 2048, "t5xl": 2048, "google/flan-t5-xxl": 4096, "t5xxl": 4096}

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
# Fields whose parser default (0) we do not support: they must be given as 1.
_REQUIRED_ON = ("rope", "sos")


@dataclass
class FlowConfig(Config):
    """Architecture and sampling fields of a STARFlow / STARFlow-V flow (official names where they exist)."""

    model_type: ClassVar[str] = "flow"

    in_channels: int  # latent channels (official channel_size)
    img_size: int  # latent grid size (official img_size // VAE downsample)
    channels: int
    layers_per_block: list[int]
    txt_size: int
    txt_dim: int
    patch_size: int = 1
    top_block_channels: int | None = None
    head_dim: int = 64
    num_heads: int | None = None
    pt_seq_len: int | None = None
    cond_top_only: bool = True
    use_softplus: bool = True
    use_final_norm: bool = True
    soft_clip: float = 0.0
    seq_order: str = "L2R"
    temporal_causal: int = 0
    shallow_block_local: bool = False
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    denoiser_window: int | None = None
    local_attn_window: int | None = None
    # training / sampling fields that the pipeline needs
    noise_std: float = 0.3
    cond_noise_level: bool = False
    cfg: float = 0.0
    vae: str = "none"
    text: str = "none"
    vid_size: str | None = None
    fps_cond: bool = False
    mix_aspect: bool = False
    pixel_size: int | None = None  # the YAML's img_size, before the VAE downsample
    extra: dict[str, Any] = field(default_factory=dict)  # other official fields, kept for the record

    def validate(self) -> None:
        if self.pt_seq_len is None:
            self.pt_seq_len = self.img_size // self.patch_size
        if self.seq_order not in ("L2R", "R2L"):
            raise ValueError(f"seq_order must be 'L2R' or 'R2L', got {self.seq_order!r}")
        if self.temporal_causal and self.seq_order != "L2R":
            raise ValueError("temporal_causal requires seq_order 'L2R'")
        if not self.cond_top_only:
            # every released model conditions the deep block only; text (and guidance) in the shallow blocks
            # would need paths nothing can be checked against
            raise ValueError("cond_top_only=0 (text in the shallow blocks) is not supported")
        if self.txt_size <= 0:
            raise ValueError(f"txt_size must be positive (text-conditioned flow), got {self.txt_size}")
        for name in ("channels", "head_dim", "in_channels", "img_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2 or self.head_dim // 2 < 8 or (self.head_dim // 2 - 8) % 2:
            raise ValueError(f"head_dim {self.head_dim} is not usable with 3-D RoPE (half of it must be >= 8 and even)")
        if self.num_heads is not None and self.num_heads * self.head_dim != self.channels:
            raise ValueError(f"num_heads {self.num_heads} x head_dim {self.head_dim} must equal channels {self.channels}")
        for width in (self.channels, self.top_channels):
            if width % self.head_dim:
                raise ValueError(f"width {width} is not a multiple of head_dim {self.head_dim}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.local_attn_window is not None and self.local_attn_window < 1:
            raise ValueError(f"local_attn_window must be >= 1 latent frame, got {self.local_attn_window}")

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


def _vae_downsample(vae: str) -> int:
    name = (vae or "none").lower()
    for key, factor in VAE_DOWNSAMPLE.items():
        if key in name:
            return factor
    raise ValueError(f"unknown VAE {vae!r}: cannot derive the latent size (known: sd-vae, sdxl-vae, Wan2.2, none)")


def _text_width(text: str, override: int | None) -> int:
    if override:
        return int(override)
    if text in TEXT_WIDTH:
        return TEXT_WIDTH[text]
    if text and text.startswith("tiny-") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"unknown text encoder {text!r}: pass the text width explicitly (--txt-dim)")


def _bool(v) -> bool:
    return str(v).strip().lower() in ("1", "1.0", "true", "yes")


def official_args(raw: Any, source: str) -> dict:
    """Flatten the official YAML structure into a plain dict of argument values."""
    if isinstance(raw, dict) and "arguments" in raw:
        raw = raw["arguments"]
    if isinstance(raw, list):
        out = {}
        for item in raw:
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"{source}: each entry under 'arguments' must be a single 'name: value', got {item!r}")
            out.update(item)
        return out
    if isinstance(raw, dict):
        return dict(raw)
    raise ValueError(f"{source}: not an official STARFlow config (expected an 'arguments:' list)")


def config_from_official(args: dict, source: str = "config", txt_dim: int | None = None) -> FlowConfig:
    """Map official training arguments (spec §2) to a FlowConfig, with the parser's defaults for absent fields."""
    required = ["img_size", "channel_size", "channels", "layers_per_block", "txt_size"]
    missing = [k for k in required if k not in args]
    if missing:
        raise ValueError(f"{source}: missing required field(s): {', '.join(missing)}")
    for key, allowed in _UNSUPPORTED.items():
        if key in args and args[key] != allowed and not (allowed is None and args[key] in ("", "none", "None")):
            raise ValueError(f"{source}: {key}={args[key]!r} is not supported (only {allowed!r})")
    for key in _REQUIRED_ON:
        if not _bool(args.get(key, 0)):
            raise ValueError(f"{source}: {key}={args.get(key, 0)!r} is not supported (only 1)")

    def get(name, default=None, cast=None):
        value = args.get(name, default)
        if value is None or cast is None:
            return value
        try:
            return cast(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: field {name}={value!r} is not a valid {cast.__name__}") from None

    lpb = args["layers_per_block"]
    try:
        lpb = [int(v) for v in str(lpb).split()] if not isinstance(lpb, list) else [int(v) for v in lpb]
    except ValueError:
        raise ValueError(f"{source}: layers_per_block={args['layers_per_block']!r} is not a list of integers") from None
    blocks = get("blocks", 4, int)
    if len(lpb) == 1:
        lpb = lpb * blocks
    vae = str(get("vae", "none") or "none")
    pixel_size = get("img_size", cast=int)
    factor = _vae_downsample(vae)
    if pixel_size % factor:
        raise ValueError(f"{source}: img_size {pixel_size} is not a multiple of the VAE downsample {factor}")
    text = str(get("text", "none") or "none")
    known = {
        "img_size", "channel_size", "channels", "layers_per_block", "txt_size", "blocks", "patch_size",
        "top_block_channels", "head_dim", "num_heads", "pt_seq_len", "cond_top_only", "use_softplus",
        "use_final_norm", "soft_clip", "seq_order", "temporal_causal", "shallow_block_local",
        "learnable_self_denoiser", "conditional_denoiser", "denoiser_window", "local_attn_window", "noise_std",
        "cond_noise_level", "cfg", "vae", "text", "vid_size", "fps_cond", "mix_aspect",
    }
    extra = {k: v for k, v in args.items() if k not in known}
    cfg = get("cfg", 0.0)
    if isinstance(cfg, list):
        cfg = cfg[0]
    return FlowConfig(
        in_channels=get("channel_size", cast=int),
        img_size=pixel_size // factor,
        channels=get("channels", cast=int),
        layers_per_block=lpb,
        txt_size=get("txt_size", cast=int),
        txt_dim=_text_width(text, txt_dim),
        patch_size=get("patch_size", 4, int),
        top_block_channels=get("top_block_channels", None, int),
        head_dim=get("head_dim", 64, int),
        num_heads=get("num_heads", None, int),
        pt_seq_len=get("pt_seq_len", None, int),
        cond_top_only=_bool(get("cond_top_only", 0)),
        use_softplus=_bool(get("use_softplus", 0)),
        use_final_norm=_bool(get("use_final_norm", 0)),
        soft_clip=get("soft_clip", 0.0, float),
        seq_order=str(get("seq_order", "R2L")),
        temporal_causal=get("temporal_causal", 0, int),
        shallow_block_local=_bool(get("shallow_block_local", 0)),
        learnable_self_denoiser=_bool(get("learnable_self_denoiser", 0)),
        conditional_denoiser=_bool(get("conditional_denoiser", 0)),
        denoiser_window=get("denoiser_window", None, int),
        local_attn_window=get("local_attn_window", None, int),
        noise_std=get("noise_std", 0.3, float),
        cond_noise_level=_bool(get("cond_noise_level", 0)),
        cfg=float(cfg),
        vae=vae,
        text=text,
        vid_size=None if get("vid_size") is None else str(get("vid_size")),
        fps_cond=_bool(get("fps_cond", 0)),
        mix_aspect=_bool(get("mix_aspect", 0)),
        pixel_size=pixel_size,
        extra=extra,
    )


def load_official_yaml(path: str | Path, txt_dim: int | None = None) -> FlowConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    return config_from_official(official_args(raw, str(path)), str(path), txt_dim)


GAUSSIAN_LOG_NORM = 0.5 * math.log(2 * math.pi)
