"""Sampler settings and statistics shared by the flow's inverses (spec §5.2-§5.4)."""

from __future__ import annotations

from dataclasses import dataclass, field


class Cancelled(Exception):
    """Raised by a progress callback to stop sampling between two chunks."""


@dataclass(frozen=True)
class Jacobi:
    """Block-wise Jacobi iteration (spec §5.3): chunks of ``block_size`` tokens while in the first frame and
    ``growth`` times that after, iterated until the relative change is below ``threshold`` or ``max_iter``."""

    block_size: int = 32
    threshold: float = 1e-3
    max_iter: int = 32
    growth: int = 4
    previous_frame_init: bool = True  # start each chunk from the previous frame's tokens at the same positions

    def __post_init__(self):
        if self.block_size < 1 or self.max_iter < 1 or self.growth < 1:
            raise ValueError(f"Jacobi block_size, max_iter and growth must be >= 1, got {self}")


# The sequential inverse is the same loop with one token per chunk, solved exactly in one pass.
SEQUENTIAL = Jacobi(block_size=1, threshold=float("inf"), max_iter=1, growth=1, previous_frame_init=False)


@dataclass
class BlockStats:
    """What one block's inverse cost: transformer passes, tokens pushed through them, iterations per chunk."""

    passes: int = 0
    tokens: int = 0
    iterations: list[int] = field(default_factory=list)
    reencodes: int = 0  # sliding-window context re-encodings
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

    def summary(self) -> dict:
        return {
            i: {"passes": s.passes, "tokens": s.tokens, "chunks": s.chunks, "max_iterations": max(s.iterations, default=0),
                "reencodes": s.reencodes}
            for i, s in sorted(self.blocks.items())
        }
