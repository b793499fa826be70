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

import mlx.core as mx
import numpy as np

from starflow_mlx import media
from starflow_mlx.media import to_uint8
from tests.reference.shapes import COLOURS, DIRECTIONS, HELD_OUT, TRAIN_CAPTIONS, Analysis, Caption, analyse, edit, render

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
EDIT_VALUES = {"colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)}


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



# ----------------------------------------------------------------------------------------------------------------
# The conditioned tasks (edit, last frame, extension, inversion editing) on held-out combinations
# ----------------------------------------------------------------------------------------------------------------

# The attributes a generated clip shows: the shapes VAE (16x spatial compression, 4x4 latents) renders every shape
# as a soft blob, so a shape is trained but cannot be read back from the pixels.
MEASURED_ATTRIBUTES = ("colour", "direction")
NEAR = 8.0  # pixels (1/8 of the 64-pixel frame): "where the image has it"


def edit_cases(targets=HELD_OUT, attributes=MEASURED_ATTRIBUTES) -> list[tuple[str, str, str]]:
    """(source caption, attribute, target caption) with a held-out target and a training source one attribute away
    from it (the first such value in palette order): the edit lands on a combination never trained."""
    cases = []
    for target in targets:
        t = Caption.parse(target)
        for attribute in attributes:
            for value in EDIT_VALUES[attribute]:
                source = str(edit(t, attribute, value))
                if value != getattr(t, attribute) and source in TRAIN_CAPTIONS:
                    cases.append((source, attribute, target))
                    break
    return cases


def _centroid_distance(a, b) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


@dataclass
class TaskCase:
    """One held-out case of a task: what was asked, the analysis of the output, whether it did it."""

    caption: str
    detail: str
    analysis: Analysis
    correct: bool


def _accuracy(cases: list[TaskCase]) -> Accuracy:
    return Accuracy(sum(c.correct for c in cases), len(cases), cases)


def edit_accuracy(pipeline, seeds, cases=None, method: str = "edit", **settings) -> Accuracy:
    """Edits (``method``: "edit", the trained ``(v2v)`` task, or "inversion" editing) of a rendered source clip
    towards a held-out target caption: correct when the output has the target's colour and direction, i.e. the
    named attribute changed and the other kept."""
    out = []
    for source, attribute, target in cases or edit_cases():
        for seed in seeds:
            clip = render(source, np.random.default_rng([seed, 12]))
            if method == "edit":
                result = pipeline.edit(target, clip, seed=seed, **settings)
            else:
                result = pipeline.inversion_edit(target, clip, source_prompt=source, seed=seed, **settings)
            a = analyse(to_uint8(result.frames[0]))
            out.append(TaskCase(target, f"{attribute} from {source!r}", a, a.matches(target)))
    return _accuracy(out)


def last_frame_accuracy(pipeline, captions, seeds, **settings) -> Accuracy:
    """Clips asked to lead into a given image (the frame after a rendered clip of the caption): correct when the
    clip's last frame has the image's object (its colour, its centroid within ``NEAR`` pixels) and the clip moves
    in the caption's direction."""
    out = []
    for caption in captions:
        for seed in seeds:
            image = render(caption, np.random.default_rng([seed, 13]), frames=21)[17]
            clip = to_uint8(pipeline.last_frame(caption, image, seed=seed, **settings).frames[0])
            a, target = analyse(clip), analyse(image[None])
            end = a.track[-1]
            near = end is not None and _centroid_distance(end, target.track[0]) <= NEAR
            out.append(TaskCase(caption, f"end {end} vs image {target.track[0]}", a,
                                near and a.colour == target.colour and a.direction == Caption.parse(caption).direction))
    return _accuracy(out)


def extension_accuracy(pipeline, captions, seeds, given: int = 9, vae_colour: bool = True, **settings) -> Accuracy:
    """A rendered clip's first ``given`` frames extended to the full length: correct when the new frames keep the
    object (the first new frame within ``NEAR`` pixels of the last given one, its colour) and keep moving in the
    clip's direction. The colour kept: the caption's, or with ``vae_colour`` also the colour of the true
    continuation (the rest of the rendered clip) through the pipeline's VAE, since no flow sample decodes better
    than its VAE (the shipped VAE turns green yellowish and blue whitish in some positions of a moving shape)."""
    out = []
    for caption in captions:
        for seed in seeds:
            clip = render(caption, np.random.default_rng([seed, 14]))
            result = pipeline.extend(caption, clip[:given], given_frames=given, seed=seed, **settings)
            frames = to_uint8(result.frames[0])
            new, last_given = analyse(frames[given:]), analyse(clip[given - 1 : given])
            colours = {Caption.parse(caption).colour}
            if vae_colour:
                colours.add(analyse(vae_round_trip(pipeline, clip)[given:]).colour)
            start = new.track[0]
            near = start is not None and _centroid_distance(start, last_given.track[0]) <= NEAR
            out.append(TaskCase(caption, f"new {start} after {last_given.track[0]}, colours kept {sorted(colours)}",
                                new, near and new.colour in colours and new.direction == Caption.parse(caption).direction))
    return _accuracy(out)


def vae_round_trip(pipeline, clip: np.ndarray) -> np.ndarray:
    """``clip`` (T, H, W, 3) uint8 encoded by the pipeline's VAE (posterior mean) and decoded, uint8."""
    pixels = np.stack([media.prepare_image(frame, clip.shape[1:3]) for frame in clip])
    latent = pipeline.vae.to_flow_latent(mx.array(pixels)[None])
    decoded = np.array(pipeline.vae.from_flow_latent(latent).transpose(0, 1, 3, 4, 2))[0]
    return to_uint8(np.clip(decoded, -1, 1))
