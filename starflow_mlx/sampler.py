"""Sampling a flow: its inverse, solved block by block, as a stream of events (spec §5.2-§5.7).

The flow (``flow.py``) is the architecture: blocks, their ``step`` and ``affine``, permutations, the prefill
pass (the official "context pass"). This module decides *how* to invert it, and reports as it goes:

- ``stream_sample`` inverts the deep block first (guidance, the text prefix, the sliding window of long videos, a
  prefix of given frames), then the shallow blocks; it yields ``ChunkSolved`` after every chunk of every block,
  ``WindowMoved`` when the sliding window moves and re-encodes its overlap, ``FrameSampled`` as soon as a latent frame is
  final, and lastly ``Sampled`` with the whole latent and the statistics. A caller streams, reports progress, or
  stops (by no longer iterating: nothing else needs cancelling) between any two events.
- ``stream_denoise`` runs the learnable denoiser over time chunks (or the gradient step) and yields per chunk;
  ``FrameDenoiser`` does the same chunks fed one sampled frame at a time, handing each denoised frame out as soon
  as the frames its receptive field reaches (``denoiser_horizon``) are in, with the same values.
- ``sample`` / ``denoise`` run those to the end and return the array.

The solvers: the sequential inverse is block-wise Jacobi with one token per chunk and a single pass, so both share
one loop (``BlockSolve``), and both call the block's ``step`` exactly as the forward pass computes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Union

import mlx.core as mx

from . import arguments
from .attention import KV_BITS, KV_GROUP_SIZES
from .config import DENOISER_LAYERS, Config, bounded
from .flow import DENOISER_STEP, MetaBlock, Prefix, StarFlow, guide


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Jacobi(Config):
    """Block-wise Jacobi iteration (spec §5.3): chunks of ``block_size`` tokens while in the first frame and
    ``growth`` times that after, iterated until the relative change is below ``threshold`` or ``max_iter``."""

    block_size: int = 32
    threshold: float = 1e-3
    max_iter: int = 32
    growth: int = 4
    previous_frame_init: bool = True  # start each chunk from the previous frame's tokens at the same positions

    def validate(self) -> None:
        for name in ("block_size", "max_iter", "growth"):
            if getattr(self, name) < 1:
                raise ValueError(f"Jacobi.{name} must be >= 1, got {getattr(self, name)}")
        if self.threshold < 0:
            raise ValueError(f"Jacobi.threshold must be >= 0, got {self.threshold}")


# The sequential inverse is the same loop with one token per chunk, solved exactly in one pass (a single iteration
# never consults the threshold).
SEQUENTIAL = Jacobi(block_size=1, threshold=0.0, max_iter=1, growth=1, previous_frame_init=False)

# Official sample.py's --context_length default: latent frames a sliding window carries over when it moves.
DEFAULT_OVERLAP = 16


@dataclass(frozen=True)
class SamplerOptions(Config):
    """How to invert the flow. Validated on construction; every error names the field and the value.

    - ``guidance``: classifier-free guidance weight in the deep block (0: none; needs ``text_null``), at most
      ``arguments.MAX_GUIDANCE``.
    - ``solver``: ``SEQUENTIAL`` or a ``Jacobi(...)``.
    - ``window``: the deep block's sliding window in latent frames; ``None`` takes the model's
      ``local_attn_window`` (the window it was trained with; no window if it has none).
    - ``overlap``: latent frames a window shares with the next one, re-encoded when it moves; ``None`` takes the
      official default (16) capped at ``window - 1``.
    - ``stream_frames``: for video models whose shallow blocks work within a frame (``shallow_block_local``),
      invert the shallow blocks frame by frame as soon as the deep block has finished a frame, so that
      ``FrameSampled`` events arrive while the deep block is still solving later frames. The official sampler
      inverts each shallow block over all frames at once: the sequential solver gives the same result both ways,
      Jacobi's stopping test then sees one frame instead of all, so results differ within its threshold.
    - ``kv_bits``: quantize the deep block's KV cache to 8 or 4 bits (MLX affine, quantized attention; None: the
      compute dtype); ``kv_group_size``: elements per scale and bias, 32, 64 or 128 dividing the model's
      ``head_dim`` (None: 64, or 32 where 64 does not divide it); with ``kv_bits`` only (``StarFlow.kv_group_size``
      checks both against the model when sampling starts).
    """

    guidance: float = bounded(0.0, min=0, max=arguments.MAX_GUIDANCE)
    solver: Jacobi = SEQUENTIAL
    window: int | None = None
    overlap: int | None = None
    stream_frames: bool = False
    kv_bits: int | None = bounded(None, choices=KV_BITS)
    kv_group_size: int | None = bounded(None, choices=KV_GROUP_SIZES)

    def validate(self) -> None:
        if not isinstance(self.solver, Jacobi):
            raise ValueError(f"solver must be SEQUENTIAL or a Jacobi(...), got {self.solver!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 latent frame, got {self.window}")
        if self.overlap is not None and self.overlap < 0:
            raise ValueError(f"overlap must be >= 0 latent frames, got {self.overlap}")
        if self.window is not None and self.overlap is not None and self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window}) so the window moves")

    def sliding_window(self, flow: StarFlow) -> tuple[int, int] | None:
        """(window, overlap) in latent frames for this flow, or None without a sliding window."""
        window = self.window if self.window is not None else flow.config.local_attn_window
        if window is None:
            return None
        overlap = self.overlap if self.overlap is not None else min(DEFAULT_OVERLAP, window - 1)
        if overlap >= window:
            raise ValueError(f"overlap ({overlap}) must be smaller than window ({window}) so the window moves")
        return window, overlap


# ----------------------------------------------------------------------------------------------------------------
# Statistics and events
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BlockStats:
    """What one block's inverse cost: transformer passes, tokens pushed through them, iterations per chunk."""

    passes: int = 0
    tokens: int = 0
    iterations: list[int] = field(default_factory=list)
    reencodes: int = 0  # sliding-window moves
    reencoded_tokens: int = 0

    @property
    def chunks(self) -> int:
        return len(self.iterations)


@dataclass
class SamplerStats:
    blocks: dict[int, BlockStats] = field(default_factory=dict)  # by block index (the deep block is the last)

    def block(self, index: int) -> BlockStats:
        return self.blocks.setdefault(index, BlockStats())

    @property
    def deep(self) -> BlockStats:
        return self.blocks[max(self.blocks)]


@dataclass(frozen=True)
class ChunkSolved:
    """Block ``block`` has solved its tokens ``start`` .. ``stop - 1`` of ``total`` (its own token order) in
    ``iterations`` passes. For a block that works within frames, ``total`` counts one frame of the batch."""

    block: int
    start: int
    stop: int
    total: int
    iterations: int


@dataclass(frozen=True)
class WindowMoved:
    """The deep block's sliding window moved: its caches restarted from the text and ``overlap`` frames."""

    block: int
    first_frame: int  # first latent frame of the new window
    overlap: int


@dataclass(frozen=True)
class FrameSampled:
    """Latent frame ``index`` is final (every block inverted; before the denoiser): (B, C, H, W), float32."""

    index: int
    latent: mx.array


@dataclass(frozen=True)
class Sampled:
    """The last event: the whole latent, in the layout of the noise it was sampled from, and what it cost."""

    latent: mx.array
    stats: SamplerStats


@dataclass(frozen=True)
class FramesDenoised:
    """The denoiser has finished latent frames ``start`` .. ``stop - 1`` of ``total``: ``latent``, (B, n, C, h, w)."""

    start: int
    stop: int
    total: int
    latent: mx.array | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Denoised:
    """The last denoising event: the denoised latent."""

    latent: mx.array


SampleEvent = Union[ChunkSolved, WindowMoved, FrameSampled, Sampled]
DenoiseEvent = Union[FramesDenoised, Denoised]


# ----------------------------------------------------------------------------------------------------------------
# One block's inverse
# ----------------------------------------------------------------------------------------------------------------


class BlockSolve:
    """Inverts one block on z (B, T, H, W, C), chunk by chunk (``run`` yields the events).

    ``text`` has 2B rows [cond; uncond] when ``guidance`` > 0. ``prefix`` (permuted tokens of the first frames,
    already in ``caches`` together with the text, from a prefill) is kept and solving starts after it.
    ``window`` = (window, overlap) in frames turns on the sliding window.
    """

    def __init__(
        self,
        block: MetaBlock,
        index: int,
        z: mx.array,
        caches: list,
        solver: Jacobi,
        stats: BlockStats,
        text: mx.array | None = None,
        guidance: float = 0.0,
        window: tuple[int, int] | None = None,
        prefix: mx.array | None = None,
    ):
        B, T, H, W, C = z.shape
        self.block, self.index, self.caches, self.solver, self.stats = block, index, caches, solver, stats
        self.shape, self.frame_size, self.total = z.shape, H * W, T * H * W
        self.guidance, self.window = guidance, window
        self.text = text if block.txt_dim else None
        self.rope = block.rope(T, H, W, 0 if self.text is None else self.text.shape[1])
        zs = block.permute(z.reshape(B, self.total, C).astype(mx.float32), T)
        self.noise = mx.concatenate([zs, zs]) if guidance > 0 else zs
        N = self.noise.shape[0]
        # slot k holds token k-1 (slot 0 the SOS); unsolved tokens start as the noise itself (official init)
        self.x = mx.concatenate([block.sos(N), self.noise], axis=1)
        self.solved = 0
        if prefix is not None:
            self.solved = prefix.shape[1]
            self.x[:, 1 : 1 + self.solved] = mx.broadcast_to(prefix.astype(mx.float32), (N, self.solved, C))
        elif self.text is not None:
            block.push_text(self.text, caches, self.rope)

    def run(self) -> Iterator[ChunkSolved | WindowMoved]:
        S, F = self.total, self.frame_size
        span = S if self.window is None else min(S, self.window[0] * F)
        target = span
        while True:
            while self.solved < target:
                yield self.solve_chunk(target)
            if target >= S:
                return
            # the next window starts ``overlap`` frames before the last solved one: at least one frame later,
            # and one move suffices after a prefix longer than the window
            overlap = self.window[1]
            target = min(S, self.solved + span - overlap * F)
            self.reencode(self.x[:, self.solved + 1 - overlap * F : self.solved + 1])
            self.stats.reencodes += 1
            self.stats.reencoded_tokens += overlap * F
            yield WindowMoved(self.index, self.solved // F - overlap, overlap)

    def solve_chunk(self, target: int) -> ChunkSolved:
        """Iterate one chunk to convergence (§5.3): official chunk sizes, initial guess and stopping test."""
        solver, start, F, x = self.solver, self.solved, self.frame_size, self.x
        size = min(solver.block_size * (1 if start <= F else solver.growth), target - start)
        for i in range(solver.max_iter):
            lo = start - F if (solver.previous_frame_init and i == 0 and start > F) else start
            a, b = self.block.step(x[:, lo : lo + size], self.caches, self.rope)
            if self.guidance > 0:
                a, b = guide(a, b, self.guidance)
            new = b + a * self.noise[:, start : start + size]
            last = i == solver.max_iter - 1
            if not last:  # relative change over the whole (guided) batch, §8.7
                change = mx.mean(mx.square(new - x[:, start + 1 : start + 1 + size])) / mx.mean(mx.square(new))
            x[:, start + 1 : start + 1 + size] = new
            self.stats.passes += 1
            self.stats.tokens += size
            if last or change.item() < solver.threshold:
                break
            for cache in self.caches:  # discard this iteration's keys: the next one re-feeds the chunk
                cache.trim(size)
        mx.eval(x, *[c.state for c in self.caches])
        self.stats.iterations.append(i + 1)
        self.solved = start + size
        return ChunkSolved(self.index, start, self.solved, self.total, i + 1)

    def reencode(self, tokens: mx.array) -> None:
        """Restart the caches from the text and ``tokens`` (SOS-shifted), slots counted from 0 again (§5.4)."""
        for cache in self.caches:
            cache.reset()
        if self.text is not None:
            self.block.push_text(self.text, self.caches, self.rope)
        slots = mx.concatenate([self.block.sos(tokens.shape[0]), tokens[:, :-1]], axis=1)
        self.block.hidden(slots, None, self.rope, self.caches)

    def frames(self, first: int, stop: int) -> mx.array:
        """Solved frames ``first`` .. ``stop - 1`` of the first B rows, (B, n, H, W, C) in natural order.

        Valid for blocks whose token order keeps frames in place (identity, or the in-frame flip of
        temporal-causal video), the deep block of every STARFlow-V model."""
        B, _, H, W, C = self.shape
        F = self.frame_size
        tokens = self.x[:B, 1 + first * F : 1 + stop * F]
        return self.block.permute(tokens, stop - first).reshape(B, stop - first, H, W, C)

    def result(self) -> mx.array:
        """The block's inverse, (B, T, H, W, C), once ``run`` has finished."""
        B, T, H, W, C = self.shape
        return self.block.permute(self.x[:B, 1:], T).reshape(B, T, H, W, C)


# ----------------------------------------------------------------------------------------------------------------
# The whole flow
# ----------------------------------------------------------------------------------------------------------------


def _invert_shallow(
    flow: StarFlow, h: mx.array, video: bool, solver: Jacobi, stats: SamplerStats, caches: list,
    prefix: Prefix | None,
) -> Iterator[ChunkSolved]:
    """Invert the shallow blocks on the deep block's output h (B, T, H, W, C); returns their inverse.

    ``caches`` are the sample's (``StarFlow.make_cache``), emptied before each use: with ``stream_frames`` they
    serve one frame after the other."""
    B, T, H, W, C = h.shape
    local = flow.shallow_local(video, T)
    for i in reversed(range(len(flow.blocks) - 1)):
        block = flow.blocks[i]
        inp = h.reshape(B * T, 1, H, W, C) if local else h
        # shallow-local blocks start afresh per frame; others continue from their prefill
        keep = prefix is not None and not local
        if keep:
            block_caches = prefix.caches[i]
        else:
            block_caches = caches[i]
            for cache in block_caches:
                cache.reset()
        solve = BlockSolve(block, i, inp, block_caches, solver, stats.block(i),
                           prefix=prefix.tokens[i] if keep else None)
        yield from solve.run()
        h = solve.result().reshape(B, T, H, W, C)
    return h


def _sampling_conditioning(
    flow: StarFlow, z: mx.array, text, text_null, options, prefix,
) -> tuple[SamplerOptions, mx.array | None]:
    """The checked options and the deep block's text rows of one sample.

    Without a prefix, ``text`` (and ``text_null`` under guidance) are required. With one, the rule is: the call
    either omits ``text`` and ``text_null`` (and ``options``, or gives ``options.guidance`` equal to the prefix's)
    and samples with the prefix's, or gives exactly the ones the prefix was made with."""
    flow.check_latent("z", z)
    if options is None:
        options = SamplerOptions()
        if isinstance(prefix, Prefix):
            options = SamplerOptions(guidance=prefix.guidance, kv_bits=prefix.kv_bits,
                                     kv_group_size=prefix.kv_group_size)
    if not isinstance(options, SamplerOptions):
        raise ValueError(f"options must be a SamplerOptions, got {type(options).__name__}")
    kv_group_size = flow.kv_group_size(options.kv_bits, options.kv_group_size, "options.")
    guidance = options.guidance
    if prefix is None:
        flow.check_conditioning(z, text, text_null, guidance)
        return options, None if text is None else flow.guided_text(text, text_null, guidance)
    flow.check_prefix(prefix, z)
    if guidance != prefix.guidance:
        raise ValueError(f"options.guidance {guidance} differs from the prefix's guidance {prefix.guidance}")
    if (options.kv_bits, kv_group_size) != (prefix.kv_bits, prefix.kv_group_size):
        raise ValueError(f"options.kv_bits {options.kv_bits} with group size {kv_group_size} differ from the "
                         f"prefix's KV cache ({prefix.kv_bits}, group size {prefix.kv_group_size}): make the prefix "
                         f"with the same kv_bits and kv_group_size (StarFlow.prefill)")
    if text is None:
        if text_null is not None:
            raise ValueError("text_null was given without text: with a prefix, pass both (as given to prefill) or "
                             "neither (the prefix's are used)")
        return options, prefix.text
    flow.check_conditioning(z, text, text_null, guidance)
    text_g = flow.guided_text(text, text_null, guidance)
    if not mx.array_equal(text_g, prefix.text):
        raise ValueError("text / text_null differ from the ones the prefix was made with (StarFlow.prefill): pass "
                         "those, or neither")
    return options, text_g


def stream_sample(
    flow: StarFlow,
    z: mx.array,
    text: mx.array | None,
    text_null: mx.array | None = None,
    options: SamplerOptions | None = None,
    prefix: Prefix | None = None,
) -> Iterator[SampleEvent]:
    """Sample by inverting the flow on Gaussian ``z``, deep block first; yields the events above, the last one
    ``Sampled``. The arguments are checked here, before the first event (each error is a ``ValueError``):

    - ``z``: (B, C, H, W) image or (B, T, C, H, W) video latent, floating point (sampling runs in float32),
      ``in_channels`` channels, H and W multiples of ``patch_size`` (any such size: RoPE adapts to the aspect
      ratio).
    - ``text``: the prompt embedding (B, txt_size, txt_dim); ``text_null``: the unconditional one, (1 or B,
      txt_size, txt_dim), required when ``options.guidance`` > 0.
    - ``options``: a ``SamplerOptions`` (default: no guidance, or the prefix's guidance); its sliding window
      always moves by at least one frame, so sampling ends for every clip length.
    - ``prefix`` (from this model's ``StarFlow.prefill``, same batch and frame size, fewer frames than ``z``)
      conditions on given first frames; one prefix serves one sample. Its text and guidance are the ones it was
      made with: omit ``text`` and ``text_null`` to use them, or pass exactly those (anything else is refused);
      ``options.kv_bits`` / ``kv_group_size`` must be the ones the prefix's caches were made with.
    """
    options, text_g = _sampling_conditioning(flow, z, text, text_null, options, prefix)
    window = options.sliding_window(flow) if z.ndim == 5 else None
    if prefix is not None:
        prefix.used = True
    return _sample_events(flow, z, text_g, options, window, prefix)


def _sample_events(
    flow: StarFlow, z: mx.array, text_g: mx.array | None, options: SamplerOptions, window: tuple[int, int] | None,
    prefix: Prefix | None,
) -> Iterator[SampleEvent]:
    video = z.ndim == 5
    guidance = options.guidance
    h = flow.patchify(z.astype(mx.float32))
    B, T, H, W, C = h.shape
    F = H * W
    stats = SamplerStats()
    n = len(flow.blocks)
    text_len = 0 if text_g is None else text_g.shape[1]
    # Buffers are allocated at first use, so the caches a prefix replaces cost nothing.
    caches = flow.make_cache(T, z.shape[-2], z.shape[-1], text_len, None if window is None else window[0],
                             options.kv_bits, options.kv_group_size)
    solve = BlockSolve(
        flow.blocks[-1], n - 1, h, prefix.caches[-1] if prefix is not None else caches[-1], options.solver, stats.block(n - 1),
        text=text_g, guidance=guidance,
        window=window, prefix=prefix.tokens[-1] if prefix is not None else None,
    )
    if streams_frames(flow, options, z):
        frames = []
        for event in itertools.chain([None], solve.run()):  # None: frames given as a prefix are already final
            if event is not None:
                yield event
            while len(frames) < solve.solved // F:  # the shallow blocks finish each frame the deep block has
                t = len(frames)
                one = yield from _invert_shallow(flow, solve.frames(t, t + 1), video, options.solver, stats, caches, None)
                frames.append(one)
                yield FrameSampled(t, flow.unpatchify(one, True)[:, 0])
        h = mx.concatenate(frames, axis=1)
    else:
        yield from solve.run()
        h = yield from _invert_shallow(flow, solve.result(), video, options.solver, stats, caches, prefix)
        latent = flow.unpatchify(h, True)
        for t in range(T):
            yield FrameSampled(t, latent[:, t])
    yield Sampled(flow.unpatchify(h, video), stats)


def streams_frames(flow: StarFlow, options: SamplerOptions, z: mx.array) -> bool:
    """Whether sampling ``z`` with ``options`` hands each latent frame out (``FrameSampled``) while the deep block
    is still solving later ones: ``stream_frames`` on a video flow whose shallow blocks work within frames."""
    return options.stream_frames and z.ndim == 5 and flow.shallow_local(True, z.shape[1])


def sample(flow: StarFlow, z: mx.array, text: mx.array | None, text_null: mx.array | None = None,
           options: SamplerOptions | None = None, prefix: Prefix | None = None) -> mx.array:
    """``stream_sample`` run to the end: the sampled latent."""
    return _last(stream_sample(flow, z, text, text_null, options, prefix)).latent


# ----------------------------------------------------------------------------------------------------------------
# Denoising after sampling (§5.7)
# ----------------------------------------------------------------------------------------------------------------


def stream_denoise(
    flow: StarFlow, x: mx.array, text: mx.array | None, window: int | None = None
) -> Iterator[DenoiseEvent]:
    """One Tweedie step removing the training noise: the learnable denoiser (x - 0.3 * pred) over chunks of
    ``window`` frames (default: the model's ``local_attn_window``, as the official sampler) overlapping by the
    model's ``denoiser_window``, or, for a flow without a denoiser, the gradient step x - sigma^2 * grad NLL.

    ``x``: a sampled (B, C, H, W) or (B, T, C, H, W) latent; ``text``: (B, txt_size, txt_dim), required unless the
    learnable denoiser is unconditional; ``window``: an integer >= 1 or None. Checked here, before the first event.
    """
    flow.check_latent("x", x)
    needs_text = flow.denoiser.txt_dim > 0 if hasattr(flow, "denoiser") else flow.text_conditioned
    flow.check_text(text, x.shape[0], required=needs_text)
    window = arguments.integer("window", window, minimum=1, optional=True)
    if not hasattr(flow, "denoiser"):
        return _single_event(Denoised(flow.gradient_denoise(x, text)))
    if x.ndim == 4:
        return _single_event(Denoised(x - DENOISER_STEP * flow.predict_noise(x[:, None], text, video=False)[:, 0]))
    return _denoise_chunks(FrameDenoiser(flow, text, x.shape[1], window), x)


def _time_chunks(flow: StarFlow, frames: int, window: int | None) -> tuple[int, int]:
    """(frames per denoiser chunk, frames a chunk shares with the previous one) for a clip of ``frames``."""
    steps = window or flow.config.local_attn_window or frames
    overlap = flow.config.denoiser_window if flow.config.denoiser_window is not None else steps - 1
    if frames > steps and not 0 <= overlap < steps:  # else the chunk would not move forward
        raise ValueError(f"denoiser_window {overlap} must be >= 0 and smaller than the {steps}-frame chunk")
    return steps, overlap


def _single_event(event: Denoised) -> Iterator[DenoiseEvent]:
    yield event


def _denoise_chunks(denoiser: "FrameDenoiser", x: mx.array) -> Iterator[DenoiseEvent]:
    yield from denoiser.push(x)
    yield denoiser.finish()


def denoiser_horizon(block_causal: int, layers: int = DENOISER_LAYERS) -> int | None:
    """Latent frames after frame f that the learnable denoiser's output at f depends on, or None for every frame
    of its chunk (``block_causal`` 0: no mask, the denoiser is bidirectional).

    Why ``layers * (block_causal - 1)``: ``denoiser.window_mask`` lets a query of frame f attend to key frames up to
    f + A - 1 (A = ``block_causal``, the model's ``temporal_causal``), and the text rows to frames 0 .. A - 1. So
    after l layers frame f holds information from input frames up to f + l (A - 1) through the frames, and the
    text rows from frames up to (l - 1)(A - 1) only, which is less. A key frame that no query can reach is masked
    out (its softmax weight is exactly 0), so the denoiser run on the chunk cut after frame f + horizon gives
    frame f the values of the whole chunk (RoPE rows and the mask depend on the slot, not on the length)."""
    return None if block_causal == 0 else layers * (block_causal - 1)


class FrameDenoiser:
    """The learnable denoiser of a video fed sampled latent frames in order (``push``), handing out each denoised
    frame as soon as it is final: the values of ``denoise`` of the whole latent (the official chunks of ``window``
    frames overlapping by the model's ``denoiser_window``; a chunk's first frames are the previous chunk's denoised
    ones), within float32 rounding.

    A frame of the current chunk is final once the frames up to ``denoiser_horizon`` after it are in (or the whole
    chunk is). Each pass runs the denoiser on the chunk cut after the frames pushed so far; a pass before the
    chunk is complete must at least double the chunk's final frames, so a chunk of n frames costs at most
    1 + log2(n) passes of at most n frames: at most ~2x the denoiser work of one pass per chunk (plus one horizon
    per partial pass), the price of frames that leave before the chunk is done. Frames pushed all at once take
    exactly one pass per chunk, the official order.
    """

    def __init__(self, flow: StarFlow, text: mx.array | None, frames: int, window: int | None = None,
                 horizon: int | None = -1):
        self.flow, self.text, self.total = flow, text, frames
        self.steps, self.overlap = _time_chunks(flow, frames, window)
        # horizon: -1 derives it from the model (another value is for testing the derivation)
        self.horizon = denoiser_horizon(flow.config.temporal_causal) if horizon == -1 else horizon
        # (B, C, h, w) each: the chunks' inputs, as sampled, then as denoised by a finished chunk (official: the
        # next chunk starts with the frames it shares with the previous one denoised); and the final frames
        self.frames: list[mx.array] = []
        self.denoised: list[mx.array] = []
        self.start = self.first = self.final = 0  # current chunk: its first frame, the first it writes; frames done

    def push(self, latent_frames: mx.array) -> Iterator[FramesDenoised]:
        """Add the next sampled frames (B, n, C, h, w); returns an iterator of the ``FramesDenoised`` (with their
        frames) that became final, in order, computed as it is consumed (consume it before the next push)."""
        if len(self.frames) + latent_frames.shape[1] > self.total:
            raise ValueError(f"pushed {len(self.frames) + latent_frames.shape[1]} latent frames, more than the "
                             f"{self.total} of the clip")
        self.frames.extend(latent_frames[:, i] for i in range(latent_frames.shape[1]))
        return self._final_frames()

    def _final_frames(self) -> Iterator[FramesDenoised]:
        while self.final < self.total:
            stop = min(self.start + self.steps, self.total)  # the chunk's end
            given = min(len(self.frames), stop)
            if given == stop:
                ready = stop
            elif self.horizon is None:
                break
            else:
                ready = given - self.horizon
                if ready < self.first + 2 * (self.final - self.first):  # a partial pass must at least double
                    break
            if ready <= self.final:
                break
            yield self._pass(given, ready)
            if self.final == stop:
                self.frames[self.first : stop] = self.denoised[self.first : stop]
                self.start, self.first = self.start + self.steps - self.overlap, stop

    def _pass(self, given: int, ready: int) -> FramesDenoised:
        chunk = mx.stack(self.frames[self.start : given], axis=1)
        pred = self.flow.predict_noise(chunk, self.text, video=True)
        out = (chunk - DENOISER_STEP * pred)[:, self.final - self.start : ready - self.start]
        mx.eval(out)
        self.denoised.extend(out[:, i] for i in range(out.shape[1]))
        event = FramesDenoised(self.final, ready, self.total, out)
        self.final = ready
        return event

    def finish(self) -> Denoised:
        """The last event, once every frame was pushed: the denoised latent (B, T, C, h, w)."""
        if self.final < self.total:
            raise ValueError(f"{self.final} of {self.total} latent frames are denoised: push the rest first")
        return Denoised(mx.stack(self.denoised, axis=1))


def denoise(flow: StarFlow, x: mx.array, text: mx.array | None, window: int | None = None) -> mx.array:
    """``stream_denoise`` run to the end: the denoised latent."""
    return _last(stream_denoise(flow, x, text, window)).latent


def _last(events):
    event = None
    for event in events:
        pass
    return event
