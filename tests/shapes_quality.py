"""How well a shapes pipeline does what its captions say: shared by the shipped model's tests
(``tests/test_shapes_model.py``) and its benchmark (``benchmarks/bench_shapes.py``), which prints the figures of
BENCHMARKS.md.

- prompt accuracy: generated clips whose moving blob has the caption's colour and moves in its direction
  (``tests.reference.shapes.analyse``);
- likelihood ranking: a real clip's bits/dim under its true caption against a wrong caption;
- best of N: of N samples, the one the model scores lowest (bits/dim of its re-encoded frames under the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starflow_mlx.media import to_uint8
from tests.reference.shapes import COLOURS, Analysis, Caption, analyse, render

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass
class Accuracy:
    correct: int
    total: int
    analyses: list

    @property
    def rate(self) -> float:
        return self.correct / self.total


def generate_clip(pipeline, caption: str, seed: int, **settings) -> np.ndarray:
    """uint8 (T, H, W, 3) of one sample of ``caption``."""
    return to_uint8(pipeline.text_to_video(caption, seed=seed, **settings).frames[0])


def prompt_accuracy(pipeline, captions, seeds, **settings) -> Accuracy:
    """Clips of each caption x seed whose colour and direction match the caption."""
    analyses = [(c, analyse(generate_clip(pipeline, c, s, **settings))) for c in captions for s in seeds]
    return Accuracy(sum(a.matches(c) for c, a in analyses), len(analyses), analyses)


def wrong_captions(caption: str) -> list[str]:
    """Captions that contradict ``caption``: the opposite direction, and the next colour in the palette."""
    c = Caption.parse(caption)
    colours = list(COLOURS)
    other = colours[(colours.index(c.colour) + 1) % len(colours)]
    return [str(Caption(c.colour, c.shape, OPPOSITE[c.direction])), str(Caption(other, c.shape, c.direction))]


def likelihood_ranking(pipeline, captions, seed: int = 0) -> tuple[int, int, list]:
    """For a fresh clip of each caption (rendered with ``seed``): does the true caption score fewer bits/dim than
    each wrong caption? Returns (wins, comparisons, per-clip bits [true, wrong...])."""
    rng = np.random.default_rng(seed)
    wins = total = 0
    rows = []
    for caption in captions:
        clip = render(caption, rng)
        bits = pipeline.log_likelihood(clip, [caption, *wrong_captions(caption)], seed=seed).bits_per_dim
        wins += int(np.sum(bits[0] < bits[1:]))
        total += len(bits) - 1
        rows.append(bits.tolist())
    return wins, total, rows


def mean_bits_per_dim(pipeline, captions, seed: int) -> float:
    """Mean bits/dim of a fresh clip of each caption (rendered with ``seed``) under that caption."""
    rng = np.random.default_rng(seed)
    return float(np.mean([pipeline.log_likelihood(render(c, rng), c, seed=seed).bits_per_dim[0] for c in captions]))


def best_of(pipeline, caption: str, seeds, **settings) -> tuple[Analysis, Analysis]:
    """(analysis of the first seed's sample, analysis of the sample with the lowest bits/dim under the prompt)."""
    scored = []
    for seed in seeds:
        clip = generate_clip(pipeline, caption, seed, **settings)
        bits = pipeline.log_likelihood(clip, caption, seed=0).bits_per_dim[0]
        scored.append((bits, clip))
    best = min(scored, key=lambda entry: entry[0])[1]
    return analyse(scored[0][1]), analyse(best)


def kept_first_frame(given: np.ndarray, clip: np.ndarray, tolerance: float = 6.0) -> bool:
    """Image-to-video kept the given frame's object: same colour and its centroid within ``tolerance`` pixels."""
    a, b = analyse(given[None]), analyse(clip[:1])
    if a.track[0] is None or b.track[0] is None or a.colour != b.colour:
        return False
    return bool(np.hypot(a.track[0][0] - b.track[0][0], a.track[0][1] - b.track[0][1]) <= tolerance)

