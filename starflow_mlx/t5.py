"""T5 encoder (flan-T5-XL for STARFlow / STARFlow-V text conditioning, spec §6).

STARFlow runs ``AutoModel("google/flan-t5-xl").encoder`` on the tokenized prompt and consumes
``last_hidden_state * attention_mask``: the output of the final RMS norm with padded rows set exactly to zero. This
module computes the same thing with MLX kernels, from a folder written by ``starflow-mlx convert t5``.

T5 specifics that differ from most transformers (all taken from the Hugging Face T5 implementation):

- attention scores are ``q @ k^T`` with **no** ``1/sqrt(d)`` scaling (the scale is folded into the init);
- a learned relative position bias (bidirectional log buckets) is computed once, from layer 0's table, and added in
  every layer; padded keys get the dtype's most negative finite value added to that bias;
- norms are RMS norms without mean subtraction or bias, variance accumulated in float32;
- the feed-forward block of flan-T5 is gated: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import arguments
from .config import Config, bounded
from .weights import KeyMap, compute_dtype, load_model

# feed_forward_proj -> (gated, activation). Hugging Face maps "gated-gelu" to the tanh approximation ("gelu_new")
# for backwards compatibility with the original T5 v1.1 / flan checkpoints, while a plain "gelu" is the exact one.
_FEED_FORWARD = {
    "relu": (False, "relu"),
    "gated-relu": (True, "relu"),
    "gelu": (False, "gelu"),
    "gated-gelu": (True, "gelu_tanh"),
    "gelu_new": (False, "gelu_tanh"),
    "gated-gelu_new": (True, "gelu_tanh"),
    "silu": (False, "silu"),
    "gated-silu": (True, "silu"),
}

_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "gelu_tanh": nn.gelu_approx,
    "silu": nn.silu,
}


# Upper bounds: about 10x the largest released T5 encoders (flan-T5-XXL: d_model 4096, 64 heads, d_ff 10240;
# T5-11B: d_kv 128, 128 heads, d_ff 65536; mT5: a 250,112-token vocabulary; 24 layers).
MAX_T5_PARAMETERS = 60_000_000_000


@dataclass
class T5Config(Config):
    """Architecture of a T5 encoder (Hugging Face field names); defaults are google/flan-t5-xl."""

    model_type: ClassVar[str] = "t5"
    max_parameters: ClassVar[int] = MAX_T5_PARAMETERS

    vocab_size: int = bounded(32128, min=1, max=1 << 22)
    d_model: int = bounded(2048, min=1, max=1 << 15)
    d_kv: int = bounded(64, min=1, max=1024)
    d_ff: int = bounded(5120, min=1, max=1 << 19)
    num_layers: int = bounded(24, min=1, max=256)
    num_heads: int = bounded(32, min=1, max=1024)
    # half the buckets for each direction, half of those exact: an even count >= 4
    relative_attention_num_buckets: int = bounded(32, min=4, max=1024, multiple_of=2)
    relative_attention_max_distance: int = bounded(128, min=1, max=1 << 16)
    layer_norm_epsilon: float = bounded(1e-6, above=0, max=0.1)
    feed_forward_proj: str = bounded("gated-gelu", choices=tuple(_FEED_FORWARD))

    def validate(self) -> None:
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                f"relative_attention_max_distance ({self.relative_attention_max_distance}) must exceed "
                f"relative_attention_num_buckets // 4 ({self.relative_attention_num_buckets // 4})"
            )

    def parameter_count(self) -> int:
        """Weights of ``T5Encoder(self)``: no biases; one relative bias table, in layer 0."""
        d, inner = self.d_model, self.num_heads * self.d_kv
        feed_forward = (3 if self.gated else 2) * d * self.d_ff
        layer = 4 * d * inner + feed_forward + 2 * d  # q, k, v, o; the feed-forward; two norms
        return self.vocab_size * d + self.num_layers * layer + self.relative_attention_num_buckets * self.num_heads + d

    @property
    def gated(self) -> bool:
        return _FEED_FORWARD[self.feed_forward_proj][0]

    @property
    def activation(self) -> str:
        return _FEED_FORWARD[self.feed_forward_proj][1]


@lru_cache(maxsize=16)
def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of every (query, key) pair, as an int32 array [query_len, key_len].

    Half the buckets are for keys after the query. Within a half, distances below ``num_buckets // 4`` get their own
    bucket and larger ones share logarithmically sized buckets up to ``max_distance``, beyond which everything falls
    into the last bucket. The logarithm is evaluated in float32 as in the PyTorch reference, so that distances on a
    bucket boundary (16, 32, 64 for flan-T5) truncate the same way.
    """
    relative = np.arange(key_len, dtype=np.int64)[None, :] - np.arange(query_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
        large = max_exact + (
            log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
        )
    large = np.minimum(np.where(distance < max_exact, 0, large).astype(np.int64), half - 1)
    buckets += np.where(distance < max_exact, distance, large)
    buckets = buckets.astype(np.int32)
    buckets.flags.writeable = False  # cached: shared between calls
    return buckets


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias (``mx.fast.rms_norm`` accumulates in float32)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        # T5 has no 1/sqrt(d_kv) factor: scale=1. The additive ``bias`` carries position bias and padding mask.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.gated
        self.act = _ACTIVATIONS[config.activation]
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.act(self.wi(x))
        return self.wo(h)


class T5Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attention_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attention = T5Attention(config)
        self.ffn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = _clamp_half(x + self.attention(self.attention_norm(x), bias))
        return _clamp_half(x + self.ffn(self.ffn_norm(x)))


def _clamp_half(x: mx.array) -> mx.array:
    # The reference clamps float16 activations just below the largest finite value so that an overflow in one
    # layer does not turn into inf/NaN; other dtypes are left alone.
    if x.dtype == mx.float16:
        limit = float(np.finfo(np.float16).max) - 1000.0
        return mx.clip(x, -limit, limit)
    return x


class T5Encoder(nn.Module):
    """T5 encoder stack: embedding, ``num_layers`` pre-norm blocks sharing one relative position bias, final norm."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        # Only layer 0 of the reference owns a relative bias table; every layer reuses its output.
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = [T5Block(config) for _ in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, length: int) -> mx.array:
        """Relative position bias [1, heads, length, length] in the bias table's dtype."""
        c = self.config
        buckets = relative_position_buckets(
            length, length, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        bias = self.relative_attention_bias(mx.array(buckets))  # [L, L, H]
        return bias.transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """``last_hidden_state`` [B, L, d_model], float32, computed in the weights' dtype (padded rows are not zeroed
        here; see ``encode``). ``input_ids``: an integer mx.array [B, L] of ids in [0, vocab_size);
        ``attention_mask``: None or [B, L] of 0 (padding) and 1 (token), integer or bool."""
        arguments.token_ids(input_ids, attention_mask, self.config.vocab_size, mask_required=False)
        return self._hidden(input_ids, attention_mask)

    def _hidden(self, input_ids: mx.array, attention_mask: mx.array | None) -> mx.array:
        B, L = input_ids.shape
        dtype = compute_dtype(self)  # the dtype policy: compute in the weights' dtype, hand on float32
        x = self.embed_tokens(input_ids).astype(dtype)
        bias = self.position_bias(L).astype(dtype)
        if attention_mask is not None:
            # The most negative finite value rather than -inf, as in the reference: a fully padded row then stays
            # finite (uniform attention) instead of becoming NaN.
            neg = float(mx.finfo(bias.dtype).min)
            keys_out = (attention_mask[:, None, None, :] == 0).astype(bias.dtype) * neg
            bias = bias + keys_out
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_layer_norm(x).astype(mx.float32)

    def encode(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """What STARFlow consumes, float32: ``last_hidden_state * attention_mask[..., None]`` (padded rows 0).
        The arguments as for the call, the mask required."""
        arguments.token_ids(input_ids, attention_mask, self.config.vocab_size, mask_required=True)
        hidden = self._hidden(input_ids, attention_mask)
        return hidden * attention_mask[..., None].astype(hidden.dtype)


def encode_prompts(model: T5Encoder, tokenizer, texts, max_length: int) -> mx.array:
    """Tokenize already-templated prompts (see ``starflow_mlx.prompts``) and encode them: [B, max_length, d_model],
    padded rows zero, i.e. the official ``encode_text`` for a T5 encoder. ``texts``: a prompt or a non-empty list
    of prompts; ``max_length``: an integer in [1, 4096] (the flow's ``txt_size``)."""
    texts, max_length = arguments.prompts(texts), arguments.prompt_length(max_length)
    input_ids, attention_mask = tokenizer(texts, max_length)
    return model.encode(input_ids, attention_mask)


def load_t5(folder: str | os.PathLike, dtype: str | mx.Dtype | None = None) -> T5Encoder:
    """Load a folder written by ``starflow-mlx convert t5``; ``dtype`` casts its floating weights (e.g. "float32")."""
    return load_model(folder, T5Config, T5Encoder, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoint names (``starflow-mlx convert t5``)
# ----------------------------------------------------------------------------------------------------------------


# Hugging Face T5 encoder names -> ours (a T5EncoderModel / T5ForConditionalGeneration state dict, ``encoder.*``);
# {w} is an attention projection, {f} a feed-forward matrix. Linear weights keep their [out, in] layout.
HF_NAMES = KeyMap(
    [
        ("encoder.block.{i}.layer.0.SelfAttention.{w}.weight", "layers.{i}.attention.{w}.weight"),
        ("encoder.block.{i}.layer.0.layer_norm.weight", "layers.{i}.attention_norm.weight"),
        ("encoder.block.{i}.layer.1.DenseReluDense.{f}.weight", "layers.{i}.ffn.{f}.weight"),
        ("encoder.block.{i}.layer.1.layer_norm.weight", "layers.{i}.ffn_norm.weight"),
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_attention_bias.weight"),
        ("encoder.embed_tokens.weight", "embed_tokens.weight"),
        ("encoder.final_layer_norm.weight", "final_layer_norm.weight"),
    ],
    fields={"w": "[qkvo]", "f": "wi_0|wi_1|wi|wo"},
)
