"""The STARFlow / STARFlow-V normalizing flow: deep-shallow stack of transformer autoregressive flow blocks.

Layouts: images (B, C, H, W) and videos (B, T, C, H, W) at the API; inside, every tensor is (B, T, H, W, C) with
T = 1 for images (a one-frame video has the same positions, permutations and masks as an image) and blocks work
on flattened (B, S, C) token sequences, S = T*H*W.

Block i maps x -> z = (x - b(x_<)) / a(x_<) in its own token order; the deep (last) block alone sees the text, as a
causal prefix, and classifier-free guidance. This module is the architecture and the training direction; sampling
(inverting it, deep block first) is ``sampler.py``, which calls the blocks' ``step``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import arguments
from .attention import KVCache, QuantizedKVCache, RMSNorm, SlotCache, TransformerLayer, resolve_kv_group_size
from .config import GAUSSIAN_LOG_NORM, FlowConfig
from .rope import rope_table
from .weights import KeyMap, compute_dtype, load_model

# softplus(s + ln(e - 1)) = 1 at s = 0: an untrained block is the identity (spec §4.3, pitfall §8.5)
INV_SOFTPLUS_1 = 0.541324854612918
# Linear layers never quantized: proj_in's input width (latent channels) is below any group size, and proj_out
# produces the affine scale and shift directly, where quantization error would land on every sample.
QUANT_SKIP = ("proj_in", "proj_out")
# x - pred * 0.3 * (sigma_cur - sigma_next) / sigma_cur with sigma_next = 0 (official apply_denoising)
DENOISER_STEP = 0.3
# The most tokens per evaluation of a pass over known tokens (scoring, the prefill), which otherwise evaluates one
# latent frame at a time (``StarFlow.score_chunk``): attention scores cost chunk x S instead of S x S, and one
# chunk of a 7B deep block is well under a second of GPU work, far from the macOS watchdog (mlx-lm prefills prompts
# in steps of 2048 tokens for the same reasons).
SCORE_CHUNK = 1024


def guide(a: mx.array, b: mx.array, weight: float) -> tuple[mx.array, mx.array]:
    """Classifier-free guidance on per-token Gaussians N(b, a^2), rows [cond; uncond] (spec §5.2).

    N(b_c, a_c^2)^(1+w) / N(b_u, a_u^2)^w with the ratio a_c/a_u clipped at 1 before squaring, so the precision
    denominator 1 + w - w*s stays >= 1. The guided values go to both halves (the uncond branch consumes them).
    """
    n = a.shape[0] // 2
    a_c, a_u, b_c, b_u = a[:n], a[n:], b[:n], b[n:]
    s = mx.square(mx.minimum(a_c / a_u, 1.0))
    denom = 1 + weight - weight * s
    a_g = a_c / mx.sqrt(denom)
    b_g = ((1 + weight) * b_c - (weight * s) * b_u) / denom
    return mx.concatenate([a_g, a_g]), mx.concatenate([b_g, b_g])


class MetaBlock(nn.Module):
    """One autoregressive affine flow step: a causal transformer over the SOS-shifted, permuted token sequence."""

    def __init__(self, config: FlowConfig, dims: int, num_layers: int, txt_dim: int, permutation: str):
        super().__init__()
        cin = config.patch_channels
        self.sos_embed = mx.zeros((1, 1, cin))
        self.proj_in = nn.Linear(cin, dims)
        if txt_dim:
            self.proj_txt = nn.Linear(txt_dim, dims)
        self.layers = [TransformerLayer(dims, config.head_dim) for _ in range(num_layers)]
        if config.use_final_norm:
            self.final_norm = RMSNorm(dims)
        self.proj_out = nn.Linear(dims, 2 * cin)
        self.txt_dim = txt_dim
        self.permutation = permutation
        self.flip_in_frame = config.temporal_causal != 0
        self.soft_clip = config.soft_clip
        self.use_softplus = config.use_softplus
        self.use_final_norm = config.use_final_norm
        self.head_dim = config.head_dim
        self.pt_seq_len = config.pt_seq_len

    # ---- token order ----
    def permute(self, x: mx.array, frames: int) -> mx.array:
        """Natural raster order -> this block's order; an involution, so it also un-permutes."""
        if self.permutation == "identity":
            return x
        if self.flip_in_frame and frames > 1:
            B, S, C = x.shape
            return x.reshape(B, frames, S // frames, C)[:, :, ::-1].reshape(B, S, C)
        return x[:, ::-1]

    def rope(self, frames: int, h: int, w: int, txt_len: int) -> tuple[mx.array, mx.array]:
        return rope_table(h, w, frames, txt_len if self.txt_dim else 0, self.pt_seq_len, self.head_dim)

    def make_cache(
        self, max_size: int | None = None, kv_bits: int | None = None, kv_group_size: int | None = None
    ) -> list[SlotCache]:
        """One KV cache per layer, sized for ``max_size`` slots (text + tokens) when the length is known; float, or
        quantized to ``kv_bits`` (4 or 8) in groups of ``kv_group_size`` (``attention.resolve_kv_group_size``)."""
        group_size = resolve_kv_group_size(kv_bits, kv_group_size, self.head_dim)
        if group_size is None:
            return [KVCache(max_size) for _ in self.layers]
        return [QuantizedKVCache(max_size, kv_bits, group_size) for _ in self.layers]

    # ---- the shared pieces of forward, sequential and Jacobi inverses ----
    def hidden(self, slots, text, rope, caches=None) -> mx.array:
        """Transformer over ``[proj_txt(text) ; proj_in(slots)]`` (either may be None); returns the slot part."""
        dtype = compute_dtype(self.proj_out)  # a small layer: the block's dtype without walking all its weights
        parts = []
        if text is not None:
            parts.append(self.proj_txt(text.astype(dtype)))
        if slots is not None:
            parts.append(self.proj_in(slots.astype(dtype)))
        h = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        txt_len = 0 if text is None else text.shape[1]
        cos, sin = rope
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            h = layer(h, cos, sin, "causal", cache)
        return h[:, txt_len:]

    def affine(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Scale a > 0 and shift b, float32, from hidden states (soft clip before the split, §8.4)."""
        if self.use_final_norm:
            h = self.final_norm(h)
        out = self.proj_out(h)
        if self.soft_clip > 0:
            out = self.soft_clip * mx.tanh(out / self.soft_clip)
        s, b = mx.split(out.astype(mx.float32), 2, axis=-1)
        a = nn.softplus(s + INV_SOFTPLUS_1) if self.use_softplus else mx.exp(s)
        return a, b

    def step(self, slots: mx.array, caches: list[SlotCache], rope) -> tuple[mx.array, mx.array]:
        """(a, b) for a run of input slots appended to the cache: 1 slot (sequential) or a chunk (Jacobi)."""
        return self.affine(self.hidden(slots, None, rope, caches))

    def push_text(self, text: mx.array, caches: list[SlotCache], rope) -> None:
        """Fill the caches with the text prefix (positions 0..L-1) before solving image tokens."""
        self.hidden(None, text, rope, caches)

    def teacher_forced(self, slots, text, rope, caches, chunk: int) -> tuple[mx.array, mx.array]:
        """(a, b) of every slot, as ``affine(hidden(slots, text))`` computes them, but ``chunk`` slots at a time
        through KV caches (``caches``, or temporary ones), each chunk evaluated before the next: attention scores
        cost chunk x S instead of S x S, and no single evaluation runs longer than one chunk (the macOS GPU
        watchdog). The sampler's ``step`` on known inputs, so the numbers are the whole pass's up to float32."""
        if caches is None:
            caches = self.make_cache(slots.shape[1] + (0 if text is None else text.shape[1]))
        if text is not None:
            self.push_text(text, caches, rope)
        scales, shifts = [], []
        for start in range(0, slots.shape[1], chunk):
            a, b = self.step(slots[:, start : start + chunk], caches, rope)
            mx.eval(a, b, *[c.state for c in caches])
            scales.append(a)
            shifts.append(b)
        return mx.concatenate(scales, axis=1), mx.concatenate(shifts, axis=1)

    def sos(self, batch: int) -> mx.array:
        return mx.broadcast_to(self.sos_embed.astype(mx.float32), (batch, 1, self.sos_embed.shape[-1]))

    # ---- training direction ----
    def __call__(self, x: mx.array, text: mx.array | None = None, guidance: float = 0.0, caches=None,
                 chunk: int | None = None):
        """x (B, T, H, W, C) -> (z in the same layout, logdet (B, S, C) in this block's token order, x_in).

        ``x_in`` is the permuted input sequence: the prefix a context pass records for later sampling (§5.5).
        ``chunk`` (tokens) runs the transformer ``teacher_forced``; None runs the whole sequence in one graph.
        """
        B, T, H, W, C = x.shape
        text = text if self.txt_dim else None
        rope = self.rope(T, H, W, 0 if text is None else text.shape[1])
        x_in = self.permute(x.reshape(B, T * H * W, C).astype(mx.float32), T)
        slots = mx.concatenate([self.sos(B), x_in[:, :-1]], axis=1)
        if chunk is None:
            a, b = self.affine(self.hidden(slots, text, rope, caches))
        else:
            a, b = self.teacher_forced(slots, text, rope, caches, chunk)
        if guidance > 0:
            a, b = guide(a, b, guidance)
        z = self.permute((x_in - b) / a, T).reshape(B, T, H, W, C)
        return z, -mx.log(a), x_in


@dataclass
class FlowOutput:
    z: mx.array  # latent, in the input layout
    logdets: list[mx.array]  # per block, -log a per element
    outputs: list[mx.array]  # patchified input, then every block's output, (B, T, H, W, C)
    prefixes: list[mx.array]  # every block's permuted input sequence (what a prefill keeps, §5.5)

    def loss(self) -> mx.array:
        """Per-sample mean NLL per dimension in nats without the Gaussian constant (the official ``get_loss``)."""
        axes = lambda t: tuple(range(1, t.ndim))  # noqa: E731
        loss = 0.5 * mx.mean(mx.square(self.z), axis=axes(self.z))
        for logdet in self.logdets:
            loss = loss - mx.mean(logdet, axis=axes(logdet))
        return loss

    def nll(self) -> mx.array:
        """Exact per-sample negative log-likelihood of the (noisy) latent, nats per dimension."""
        return self.loss() + GAUSSIAN_LOG_NORM

    def bits_per_dim(self) -> mx.array:
        return self.nll() / math.log(2.0)


class StarFlow(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        n = config.num_blocks
        self.blocks = [
            MetaBlock(
                config,
                dims=config.top_channels if i == n - 1 else config.channels,
                num_layers=config.layers_per_block[i],
                txt_dim=config.txt_dim if i == n - 1 else 0,  # cond_top_only: text in the deep block alone
                permutation=config.block_permutation(i),
            )
            for i in range(n)
        ]
        if config.learnable_self_denoiser:
            from .denoiser import Denoiser

            self.denoiser = Denoiser(config)

    # ---- layout ----
    def patchify(self, x: mx.array) -> mx.array:
        """(B, C, H, W) or (B, T, C, H, W) -> (B, T, H/p, W/p, p*p*C), channel fastest in each patch (§4.1).

        ``x`` is a latent that ``check_latent`` accepts (every public entry checks its arguments first)."""
        if x.ndim == 4:
            x = x[:, None]
        B, T, C, H, W = x.shape
        p = self.config.patch_size
        x = x.reshape(B, T, C, H // p, p, W // p, p).transpose(0, 1, 3, 5, 4, 6, 2)
        return x.reshape(B, T, H // p, W // p, p * p * C)

    def unpatchify(self, x: mx.array, video: bool) -> mx.array:
        B, T, h, w, _ = x.shape
        p, C = self.config.patch_size, self.config.in_channels
        x = x.reshape(B, T, h, w, p, p, C).transpose(0, 1, 6, 2, 4, 3, 5).reshape(B, T, C, h * p, w * p)
        return x if video else x[:, 0]

    def shallow_local(self, video: bool, frames: int) -> bool:
        """Whether the shallow blocks work within each frame (global-local STARFlow-V) for this input."""
        return self.config.shallow_block_local and video and frames > 1

    def make_cache(
        self, frames: int, height: int, width: int, text_len: int, window: int | None = None,
        kv_bits: int | None = None, kv_group_size: int | None = None,
    ):
        """KV caches for every block (by block index), sized for a clip of ``frames`` latent frames of
        ``height`` x ``width`` latent pixels: the deep block holds the text and ``window`` frames (all frames
        without a sliding window), a shallow block one frame when it works within frames, else all of them.
        ``kv_bits`` (4 or 8) quantizes the deep block's caches in groups of ``kv_group_size`` (see the method
        ``kv_group_size``); the shallow blocks' stay float (they hold one frame, or a whole image)."""
        p = self.config.patch_size
        F = (height // p) * (width // p)
        local = self.shallow_local(True, frames)
        deep = text_len + F * (frames if window is None else min(frames, window))
        return [block.make_cache(F if local else F * frames) for block in self.blocks[:-1]] + [
            self.blocks[-1].make_cache(deep, kv_bits, kv_group_size)
        ]

    def kv_group_size(self, kv_bits, kv_group_size, owner: str = "") -> int | None:
        """The group size of the deep block's KV cache for these settings (None: a float cache): ``kv_bits`` None,
        4 or 8; ``kv_group_size`` 32, 64 or 128, dividing ``head_dim``, or None for 64 (32 where 64 does not
        divide head_dim); refused with a one-line error otherwise, names prefixed by ``owner``."""
        return resolve_kv_group_size(kv_bits, kv_group_size, self.config.head_dim, owner)

    # ---- argument checks: one per kind of argument, shared by every public entry ----
    @property
    def text_conditioned(self) -> bool:
        return self.config.txt_dim > 0

    def check_latent(self, name: str, x, ndims: tuple[int, ...] = (4, 5)) -> None:
        """A latent: an image (B, C, H, W) or video (B, T, C, H, W) mx.array, floating, ``in_channels`` channels,
        H and W multiples of ``patch_size``. Any such size works: RoPE positions are scaled by pt_seq_len / sqrt(H*W)
        (the official aspect-ratio buckets), and no table is sized by the training resolution."""
        layout = {4: "(B, C, H, W) image latent", 5: "(B, T, C, H, W) video latent"}
        arguments.array(name, x, " or ".join(layout[n] for n in ndims), ndims)
        C, H, W = x.shape[-3:]
        c, p = self.config.in_channels, self.config.patch_size
        if C != c:
            raise ValueError(f"{name} must have in_channels = {c} channels (axis {x.ndim - 3}), "
                             f"got shape {list(x.shape)}")
        if H % p or W % p:
            raise ValueError(f"{name} height and width must be multiples of patch_size {p}, got {H}x{W}")

    def check_text(self, text, batch: int, required: bool = True) -> None:
        """The prompt embedding: (batch, txt_size, txt_dim), floating; None only where not ``required``. The length
        is the model's ``txt_size``: prompts are padded to it (``encode_prompts(max_length=txt_size)``), and text
        RoPE positions are i / L * pt_seq_len, so another L would move every text position off the trained ones."""
        L, D = self.config.txt_size, self.config.txt_dim
        expected = f"(B, L, D) = ({batch}, {L}, {D}) (B: the latent's batch, L: txt_size, D: txt_dim)"
        if text is None:
            if required:
                raise ValueError(f"text is required: the flow is text-conditioned; pass the T5 embedding of the "
                                 f"prompt, {expected}")
            return
        arguments.array("text", text, expected, (3,))
        if tuple(text.shape) != (batch, L, D):
            raise ValueError(f"text must be {expected}, got shape {list(text.shape)}")

    def check_text_null(self, text_null, text: mx.array, guidance: float) -> None:
        """The unconditional embedding: required when ``guidance`` > 0, (1 or B, L, D) like ``text``."""
        B, L, D = text.shape
        if text_null is None:
            if guidance > 0:
                raise ValueError(f"guidance {guidance} > 0 needs the unconditional text embedding text_null "
                                 f"(1 or {B}, {L}, {D})")
            return
        arguments.array("text_null", text_null, f"(1 or {B}, {L}, {D}) like text", (3,))
        if text_null.shape[0] not in (1, B) or tuple(text_null.shape[1:]) != (L, D):
            raise ValueError(f"text_null must be (1 or {B}, {L}, {D}) like text, got shape {list(text_null.shape)}")

    def check_conditioning(self, x: mx.array, text, text_null, guidance) -> float:
        """``text`` and ``text_null`` for latent ``x`` under ``guidance`` (in [0, MAX_GUIDANCE], returned)."""
        guidance = arguments.guidance(guidance)
        self.check_text(text, x.shape[0], required=self.text_conditioned)
        if text is not None:
            self.check_text_null(text_null, text, guidance)
        return guidance

    def check_prefix(self, prefix, z: mx.array) -> None:
        """A ``Prefix`` from this model's ``prefill``, for z's batch and frame size, with frames left to sample."""
        if not isinstance(prefix, Prefix):
            raise ValueError(f"prefix must be a Prefix from StarFlow.prefill, got {type(prefix).__name__}")
        if prefix.flow is not self:
            raise ValueError("prefix was made by another model: make it with this model's prefill")
        if prefix.used:
            raise ValueError("prefix was already sampled from (sampling extends its caches): make a new one with "
                             "prefill for each sample")
        B, given, _, H, W = prefix.shape
        frames = z.shape[1] if z.ndim == 5 else 1
        if z.shape[0] != B:
            raise ValueError(f"z has batch {z.shape[0]}, the prefix was made for batch {B}")
        if tuple(z.shape[-2:]) != (H, W):
            raise ValueError(f"z has {z.shape[-2]}x{z.shape[-1]} latent frames, the prefix was made for {H}x{W}")
        if frames <= given:
            raise ValueError(f"z must have more latent frames than the prefix's {given}, got {frames}")

    # ---- training direction ----
    def __call__(
        self, x: mx.array, text: mx.array, guidance: float = 0.0, caches=None, chunk: int | None = None,
    ) -> FlowOutput:
        """Forward pass: data (image or video latent) -> Gaussian latent, with the per-block log-determinants.

        ``x``: (B, C, H, W) or (B, T, C, H, W), ``in_channels`` channels, H and W multiples of ``patch_size``;
        ``text``: (B, txt_size, txt_dim). ``guidance`` > 0 guides the deep block on rows [cond; uncond] of an
        even batch. ``caches`` (one list of KVCache per block, by block index) are filled when given: that is the
        prefill of image-to-video (``prefill``); the per-block permuted inputs are returned as ``prefixes``.
        ``chunk``: tokens per evaluation (``MetaBlock.teacher_forced``: the numbers of one whole-sequence graph up
        to float32, without its S x S attention scores); None: ``score_chunk(x)``, one latent frame.
        """
        self.check_latent("x", x)
        guidance = arguments.guidance(guidance)
        self.check_text(text, x.shape[0], required=self.text_conditioned)
        if guidance > 0 and x.shape[0] % 2:
            raise ValueError(f"guidance > 0 needs an even batch of rows [cond; uncond], got batch {x.shape[0]}")
        chunk = arguments.integer("chunk", chunk, 1, optional=True) or self.score_chunk(x)
        return self.forward(x, text, guidance, caches, chunk)

    def score_chunk(self, x: mx.array) -> int:
        """Tokens per evaluation of a pass over the known latent ``x``: one latent frame (the unit the deep block is
        causal over, so memory stays flat in the clip's length but for the KV cache), at most ``SCORE_CHUNK``."""
        p = self.config.patch_size
        return min(SCORE_CHUNK, (x.shape[-2] // p) * (x.shape[-1] // p))

    def forward(
        self, x: mx.array, text: mx.array, guidance: float = 0.0, caches=None, chunk: int | None = None,
    ) -> FlowOutput:
        """The forward pass on arguments already checked (``__call__`` checks them; ``prefill`` and
        ``gradient_denoise`` check their own once, not again inside the pass or under ``mx.grad``); ``chunk`` None
        builds one graph over the whole sequence (what ``mx.grad`` needs: a chunked pass evaluates as it goes)."""
        video = x.ndim == 5
        h = self.patchify(x)
        B, T = h.shape[:2]
        outputs, logdets, prefixes = [h], [], []
        for i, block in enumerate(self.blocks[:-1]):
            local = self.shallow_local(video, T)
            inp = h.reshape(B * T, 1, *h.shape[2:]) if local else h
            h, logdet, x_in = block(inp, None, 0.0, caches[i] if caches is not None else None, chunk)
            if local:
                h = h.reshape(B, T, *h.shape[2:])
                logdet = logdet.reshape(B, T, -1, logdet.shape[-1])
            outputs.append(h)
            logdets.append(logdet)
            prefixes.append(x_in)
        h, logdet, x_in = self.blocks[-1](h, text, guidance, caches[-1] if caches is not None else None, chunk)
        outputs.append(h)
        logdets.append(logdet)
        prefixes.append(x_in)
        return FlowOutput(self.unpatchify(h, video), logdets, outputs, prefixes)

    def nll(self, x: mx.array, text: mx.array) -> mx.array:
        """Exact negative log-likelihood per sample in nats per dimension (divide by ln 2 for bits/dim); the
        arguments of the forward pass."""
        return self(x, text).nll()

    # ---- conditioning for sampling ----
    def guided_text(self, text: mx.array, text_null: mx.array | None, guidance: float) -> mx.array:
        """The deep block's text rows: ``text``, or [text; text_null] under guidance (the batch doubles); the
        arguments as ``check_conditioning`` accepts them."""
        if guidance <= 0:
            return text
        return mx.concatenate([text, mx.broadcast_to(text_null, text.shape)])

    def prefill(
        self, x: mx.array, text: mx.array, guidance: float = 0.0, text_null: mx.array | None = None,
        frames: int | None = None, kv_bits: int | None = None, kv_group_size: int | None = None,
    ) -> "Prefix":
        """The context pass of image-to-video / video continuation (§5.5): the forward on the given (noised)
        first latent frame(s) ``x`` ((B, C, H, W) or (B, T, C, H, W)) with fresh caches, which then hold the text
        and the prefix for sampling (``sampler.stream_sample(prefix=)``). ``text`` (B, txt_size, txt_dim);
        ``text_null`` (1 or B rows) is required when ``guidance`` > 0. The deep block keeps both guidance halves,
        the shallow blocks the conditional half only. ``frames`` (the clip's total latent frames, at least the
        given ones) and the model's sliding window size the caches (they grow if a sample needs more).
        ``kv_bits`` / ``kv_group_size`` quantize the deep block's caches (see the method ``kv_group_size``);
        sampling from the prefix must use the same."""
        self.check_latent("x", x)
        kv_group_size = self.kv_group_size(kv_bits, kv_group_size)
        guidance = self.check_conditioning(x, text, text_null, guidance)
        given = x.shape[1] if x.ndim == 5 else 1
        frames = arguments.integer("frames (the clip's latent frames, given ones included)", frames, given, True)
        shape = (x.shape[0], given, *x.shape[-3:])
        text = self.guided_text(text, text_null, guidance)
        if guidance > 0:
            x = mx.concatenate([x, x])
        H, W = x.shape[-2:]
        caches = self.make_cache(frames or given, H, W, text.shape[1], self.config.local_attn_window, kv_bits,
                                 kv_group_size)
        out = self.forward(x, text, 0.0, caches, self.score_chunk(x))
        tokens = list(out.prefixes)
        if guidance > 0:
            for i in range(len(self.blocks) - 1):
                for cache in caches[i]:
                    cache.keep_batch(x.shape[0] // 2)
                tokens[i] = tokens[i][: tokens[i].shape[0] // 2]
        mx.eval(tokens, [c.state for block_caches in caches for c in block_caches])
        return Prefix(caches, tokens, text, guidance, shape, self, kv_bits=kv_bits, kv_group_size=kv_group_size)

    # ---- convenience forms of the sampler (sampler.py) ----
    def reverse(self, z: mx.array, text: mx.array | None, text_null: mx.array | None = None, options=None,
                prefix=None):
        """Sample: invert the flow on Gaussian ``z``, run to the end (``sampler.stream_sample`` streams it and
        says what each argument accepts)."""
        from .sampler import sample

        return sample(self, z, text, text_null, options, prefix)

    def denoise(self, x: mx.array, text: mx.array | None, window: int | None = None) -> mx.array:
        """The denoising step after sampling (``sampler.stream_denoise`` streams it and says what it accepts)."""
        from .sampler import denoise

        return denoise(self, x, text, window)

    # ---- denoising (§5.7) ----
    def predict_noise(self, x: mx.array, text: mx.array | None, video: bool) -> mx.array:
        """The learnable denoiser's prediction for ``x`` (B, T, C, H, W), same layout; ``text`` (B, txt_size,
        txt_dim) is required by a conditional denoiser; ``video`` False treats x as T independent images."""
        if not hasattr(self, "denoiser"):
            raise ValueError("this flow has no learnable denoiser (learnable_self_denoiser is off): use "
                             "gradient_denoise")
        self.check_latent("x", x, ndims=(5,))
        self.check_text(text, x.shape[0], required=self.denoiser.txt_dim > 0)
        arguments.flag("video", video)
        return self.unpatchify(self.denoiser(self.patchify(x), text, video), True)

    def gradient_denoise(self, x: mx.array, text: mx.array, sigma: float | None = None) -> mx.array:
        """x - sigma^2 * d NLL_total / dx per sample (the official T2I self-denoising step, lr 1): ``x`` and
        ``text`` as the forward pass takes them, ``sigma`` > 0 (default: the model's ``noise_std``)."""
        self.check_latent("x", x)
        self.check_text(text, x.shape[0], required=self.text_conditioned)
        sigma = self.config.noise_std if sigma is None else arguments.finite_number("sigma", sigma, positive=True)
        dims = x.size // x.shape[0]
        grad = mx.grad(lambda v: self.forward(v, text).loss().sum() * dims)(x.astype(mx.float32))
        return x - sigma**2 * grad


@dataclass
class Prefix:
    """Caches and permuted input tokens of every block after a prefill (by block index), with the deep block's
    text rows, the guidance and the deep caches' quantization (``kv_bits``, and the group size resolved from the
    prefill's ``kv_group_size``; None: float) they were made with (sampling from the prefix must use the same),
    the shape of the given latent as (B, frames, C, H, W), and the model that made it (the only one its caches
    fit).

    One prefix serves one sample: sampling appends to its caches in place (copying them would double the largest
    allocation of a long video), so ``used`` is set and a second sample is refused."""

    caches: list[list[SlotCache]]
    tokens: list[mx.array]
    text: mx.array
    guidance: float
    shape: tuple[int, int, int, int, int]
    flow: StarFlow = field(repr=False, compare=False)
    used: bool = False
    kv_bits: int | None = None
    kv_group_size: int | None = None


def load_flow(folder, dtype: mx.Dtype | str | None = None) -> StarFlow:
    """A converted flow folder (``starflow-mlx convert flow``) -> StarFlow, optionally cast to ``dtype``."""
    return load_model(folder, FlowConfig, StarFlow, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Official checkpoint names (``starflow-mlx convert flow``)
# ----------------------------------------------------------------------------------------------------------------

# The official module names are ours but for three renames; PyTorch and MLX Linear weights share the [out, in]
# layout, so no tensor changes shape.
OFFICIAL_NAMES = KeyMap(
    [
        ("learnable_self_denoiser.{rest}", "denoiser.{rest}"),
        ("{pre}.attn_blocks.{rest}", "{pre}.layers.{rest}"),
        ("{pre}.mlp.main.0.{rest}", "{pre}.mlp.fc1.{rest}"),
        ("{pre}.mlp.main.2.{rest}", "{pre}.mlp.fc2.{rest}"),
    ]
)
# Buffers of the official model that no computation reads (spec §3): checkpoints carry them, the port drops them.
DEPRECATED = re.compile(r"^(var|blocks\.\d+\.attn_mask|feat_rope\.freqs_(cos|sin))$")
