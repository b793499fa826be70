"""Checks of the arguments of the public entry points (flow, sampler, T5, codecs): one helper per kind of value.

Every check raises ``ValueError`` naming the argument, what was expected and what was given, before any work is
done. Shape and dtype checks cost nothing; value checks read scalars or small integer arrays, and a floating array
costs one ``isfinite`` reduction at the entry (NaN or inf in a latent or an embedding would otherwise come out as a
silent NaN result): negligible next to the forward pass that follows.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import mlx.core as mx

# The largest classifier-free guidance weight accepted anywhere (SamplerOptions, prefill, the forward pass). The
# official configurations use weights below 10; beyond about 100 the guided Gaussians are dominated by the
# difference of the two halves and, towards float32's range, overflow to NaN.
MAX_GUIDANCE = 100.0
# The longest prompt in tokens: T5's attention is quadratic in it, and STARFlow's txt_size is a few hundred.
MAX_PROMPT_TOKENS = 4096


def _describe(value: Any) -> str:
    """What was given, for an error message: the type, and the shape and dtype of array-likes."""
    if value is None:
        return "None"
    kind = f"{type(value).__module__}.{type(value).__name__}".replace("builtins.", "")
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None:
        return f"{kind} {value!r:.60}" if isinstance(value, (numbers.Number, str)) else kind
    return f"{kind} of shape {list(shape)} and dtype {dtype}"


def array(name: str, value: Any, layout: str, ndims: tuple[int, ...] | None, floating: bool = True) -> mx.array:
    """``value`` as given if it is an ``mx.array`` of one of ``ndims`` dimensions (None: any) with no empty axis,
    floating point with finite values unless ``floating`` is False; ``layout`` (e.g. "(B, C, H, W)") names the
    expected shape."""
    if not isinstance(value, mx.array):
        hint = ": convert it with mx.array(...)" if hasattr(value, "shape") or isinstance(value, (list, tuple)) else ""
        raise ValueError(f"{name} must be an mlx array {layout}, got {_describe(value)}{hint}")
    if ndims is not None and value.ndim not in ndims:
        raise ValueError(f"{name} must be {layout}, got shape {list(value.shape)}")
    if 0 in value.shape:
        raise ValueError(f"{name} must be {layout} with no empty axis, got shape {list(value.shape)}")
    if floating and not mx.issubdtype(value.dtype, mx.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {value.dtype}")
    if floating and not mx.isfinite(value).all().item():
        raise ValueError(f"{name} holds NaN or inf values; expected finite numbers")
    return value


def finite_number(
    name: str, value: Any, minimum: float | None = None, positive: bool = False, maximum: float | None = None
) -> float:
    """``value`` as a float: a real, finite number (not a bool), >= ``minimum``, > 0 when ``positive``, <=
    ``maximum``."""
    if isinstance(value, mx.array) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return float(value)


def guidance(value: Any, name: str = "guidance") -> float:
    """A classifier-free guidance weight: a finite number in [0, ``MAX_GUIDANCE``]."""
    return finite_number(name, value, minimum=0, maximum=MAX_GUIDANCE)


def integer(name: str, value: Any, minimum: int, optional: bool = False, maximum: int | None = None) -> int | None:
    """``value`` as an int in [``minimum``, ``maximum``] (a Python or numpy integer, not a bool); None passes when
    ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, mx.array) and value.size == 1 and mx.issubdtype(value.dtype, mx.integer):
        value = value.item()
    if isinstance(value, (bool, mx.array)) or not hasattr(value, "__index__"):
        expected = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {expected}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_describe(value)}")
    return value


def prompt(name: str, text: Any) -> str:
    """A prompt: a string of valid Unicode (a lone surrogate cannot be encoded to UTF-8, which the tokenizer
    needs)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a prompt (str), got {_describe(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason} at character {e.start} "
                         f"({text[e.start]!a})") from None
    return text


def prompts(texts: Any) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list of checked prompts."""
    listed = [texts] if isinstance(texts, str) else texts
    if not isinstance(listed, (list, tuple)) or not listed:
        given = f"an empty {type(texts).__name__}" if isinstance(texts, (list, tuple)) else _describe(texts)
        raise ValueError(f"texts must be a prompt or a non-empty list of prompts (str), got {given}")
    return [prompt(f"texts[{index}]", text) for index, text in enumerate(listed)]


def prompt_length(max_length: Any) -> int:
    """The padded length of tokenized prompts: room for </s>, at most ``MAX_PROMPT_TOKENS``."""
    return integer("max_length", max_length, minimum=1, maximum=MAX_PROMPT_TOKENS)


def token_ids(input_ids: Any, attention_mask: Any, vocab_size: int, mask_required: bool) -> None:
    """Token ids: an integer (B, L) array inside [0, vocab_size), and a (B, L) attention mask of 0/1 values.

    The embedding gather does not bounds-check, so an id outside the vocabulary would read outside the table."""
    ids = array("input_ids", input_ids, "(B, L) of token ids", (2,), floating=False)
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"input_ids must be an integer array, got dtype {ids.dtype}")
    low, high = (int(v) for v in (mx.min(ids), mx.max(ids)))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the vocabulary), got token id {bad}")
    if attention_mask is None:
        if mask_required:
            raise ValueError("attention_mask is required: a (B, L) array of 1 for tokens and 0 for padding")
        return
    mask = array("attention_mask", attention_mask, f"{list(ids.shape)} like input_ids", (2,), floating=False)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {list(ids.shape)}, got {list(mask.shape)}")
    if mask.dtype == mx.bool_:
        return
    if not bool(mx.all((mask == 0) | (mask == 1))):
        low, high = mx.min(mask).item(), mx.max(mask).item()
        raise ValueError(f"attention_mask must hold only 0 and 1, got values in [{low}, {high}]")
