"""Synthetic captioned clips: one coloured shape moving in a named direction on a plain dark background.

The data of the small model shipped in the package (``starflow_mlx/models/shapes``), generated in code and seeded,
and the simple analysis that checks a generated clip against its caption: the colour of the moving blob and the
direction of its centroid track. Pure numpy; frames are uint8 (T, H, W, 3).

Captions read "a red square moving right". Twelve of the sixty (colour, shape, direction) combinations are held
out of training (``HELD_OUT``); every colour, shape and direction still appears in training with the others.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates
BACKGROUND = (24, 24, 32)

ALL_CAPTIONS = tuple(
    f"a {colour} {shape} moving {direction}" for colour, shape, direction in itertools.product(COLOURS, SHAPES, DIRECTIONS)
)
# One combination in five, chosen so that each colour, shape and direction keeps training combinations.
HELD_OUT = tuple(c for i, c in enumerate(ALL_CAPTIONS) if i % 5 == 2)
TRAIN_CAPTIONS = tuple(c for c in ALL_CAPTIONS if c not in HELD_OUT)

SIZE = 64
FRAMES = 17
FPS = 8


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str

    @classmethod
    def parse(cls, text: str) -> "Caption":
        words = text.split()
        if len(words) != 5 or words[0] != "a" or words[3] != "moving":
            raise ValueError(f"not a shapes caption: {text!r}")
        return cls(words[1], words[2], words[4])

    def __str__(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def _mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "square":
        return (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "triangle":  # pointing up: apex at the top, base at the bottom
        top, bottom = cy - radius, cy + radius * 0.8
        half = (y - top) / (bottom - top) * radius
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Motion:
    """What a clip draws besides its caption: the shape's radius, speed (pixels per frame), start centre (x, y)
    and colour jitter. An edit pair shares one Motion between its two clips."""

    radius: float
    speed: float
    start: tuple
    jitter: tuple


def _start_range(d: int, lo: float, hi: float, travel: float) -> tuple[float, float]:
    """Where a track of ``travel`` pixels along sign ``d`` may start so that it stays inside [lo, hi]."""
    if d > 0:
        return lo, hi - travel
    if d < 0:
        return lo + travel, hi
    return lo, hi


def sample_motion(caption: str | Caption, rng: np.random.Generator, frames: int = FRAMES, size: int = SIZE) -> Motion:
    """A random size, speed, start (the whole track inside the frame) and colour jitter for ``caption``."""
    c = caption if isinstance(caption, Caption) else Caption.parse(caption)
    radius = rng.uniform(0.12, 0.16) * size
    speed = rng.uniform(0.35, 0.5) * size / max(frames - 1, 1)  # travel: a third to half of the frame
    travel = speed * (frames - 1)
    lo, hi = radius + 1, size - radius - 1
    start = tuple(float(rng.uniform(*_start_range(d, lo, hi, travel))) for d in DIRECTIONS[c.direction])
    jitter = tuple(int(j) for j in rng.integers(-15, 16, 3))
    return Motion(float(radius), float(speed), start, jitter)


def moved(motion: Motion, direction: str, frames: int = FRAMES, size: int = SIZE) -> Motion:
    """``motion`` for a track in ``direction``: the same size, speed and colour, the start moved as little as
    keeps the new track inside the frame."""
    travel = motion.speed * (frames - 1)
    lo, hi = motion.radius + 1, size - motion.radius - 1
    start = tuple(float(np.clip(s, *_start_range(d, lo, hi, travel))) for s, d in zip(motion.start, DIRECTIONS[direction]))
    return Motion(motion.radius, motion.speed, start, motion.jitter)


def draw(caption: str | Caption, motion: Motion, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """The clip (frames, size, size, 3) uint8 of ``caption`` moving as ``motion`` says."""
    c = caption if isinstance(caption, Caption) else Caption.parse(caption)
    dx, dy = DIRECTIONS[c.direction]
    colour = np.clip(np.array(COLOURS[c.colour]) + np.array(motion.jitter), 0, 255).astype(np.uint8)
    clip = np.empty((frames, size, size, 3), np.uint8)
    clip[:] = np.array(BACKGROUND, np.uint8)
    for t in range(frames):
        x, y = motion.start[0] + dx * motion.speed * t, motion.start[1] + dy * motion.speed * t
        clip[t][_mask(c.shape, x, y, motion.radius, size)] = colour
    return clip


def render(caption: str | Caption, rng: np.random.Generator, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """One clip (frames, size, size, 3) uint8 of ``caption``: random size, speed, start and a small colour jitter."""
    return draw(caption, sample_motion(caption, rng, frames, size), frames, size)


ATTRIBUTES = ("colour", "shape", "direction")


def edit(caption: str | Caption, attribute: str, value: str) -> Caption:
    """``caption`` with one attribute (of ``ATTRIBUTES``) changed to ``value``."""
    c = caption if isinstance(caption, Caption) else Caption.parse(caption)
    return Caption(**{**c.__dict__, attribute: value})


def edit_pair(source: str | Caption, target: str | Caption, motion: Motion, frames: int = FRAMES,
              size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(source clip, target clip): the same motion, the target drawn with its own colour, shape and direction (a
    new direction keeps the start wherever the new track fits)."""
    t = target if isinstance(target, Caption) else Caption.parse(target)
    return draw(source, motion, frames, size), draw(t, moved(motion, t.direction, frames, size), frames, size)


def dataset(captions, count: int, seed: int, frames: int = FRAMES, size: int = SIZE):
    """``count`` clips cycling through ``captions`` (seeded): (clips uint8 (N, T, H, W, 3), list of captions)."""
    clips, chosen, _ = dataset_motions(captions, count, seed, frames, size)
    return clips, chosen


def dataset_motions(captions, count: int, seed: int, frames: int = FRAMES, size: int = SIZE):
    """``dataset`` and each clip's ``Motion``: (clips, captions, motions)."""
    chosen, motions = captions_motions(captions, count, seed, frames, size)
    return np.stack([draw(c, m, frames, size) for c, m in zip(chosen, motions)]), chosen, motions


def captions_motions(captions, count: int, seed: int, frames: int = FRAMES, size: int = SIZE):
    """The captions and motions of ``dataset``'s clips, without drawing them."""
    rng = np.random.default_rng(seed)
    captions = list(captions)
    chosen = [captions[i % len(captions)] for i in rng.permutation(count)]
    return chosen, [sample_motion(c, rng, frames, size) for c in chosen]


# ----------------------------------------------------------------------------------------------------------------
# Analysis of a generated clip
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    colour: str | None  # the palette colour nearest the blob's mean colour; None when no blob was found
    direction: str | None  # the dominant axis and sign of the centroid's travel; None when it barely moved
    travel: float  # centroid travel first -> last frame, in pixels
    track: list  # per-frame centroid (x, y), or None for a frame without a blob

    def matches(self, caption: str | Caption) -> bool:
        c = caption if isinstance(caption, Caption) else Caption.parse(caption)
        return self.colour == c.colour and self.direction == c.direction


def analyse(clip: np.ndarray, min_travel: float = 0.1) -> Analysis:
    """Colour and direction of the moving blob of ``clip`` (T, H, W, 3) uint8: pixels far from the background
    colour form the blob; its centroid's travel from the first to the last frame with a blob gives the direction
    (at least ``min_travel`` of the frame size, else None)."""
    clip = np.asarray(clip).astype(np.float32)
    size = clip.shape[2]
    distance = np.linalg.norm(clip - np.array(BACKGROUND, np.float32), axis=-1)
    mask = distance > 90
    track, colours = [], []
    for t in range(clip.shape[0]):
        ys, xs = np.nonzero(mask[t])
        if len(xs) < 4:
            track.append(None)
            continue
        track.append((float(xs.mean()), float(ys.mean())))
        colours.append(clip[t][mask[t]].mean(0))
    if not colours:
        return Analysis(None, None, 0.0, track)
    mean = np.mean(colours, 0)
    palette = np.array(list(COLOURS.values()), np.float32)
    colour = list(COLOURS)[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))]
    points = [p for p in track if p is not None]
    dx, dy = points[-1][0] - points[0][0], points[-1][1] - points[0][1]
    travel = float(np.hypot(dx, dy))
    if travel < min_travel * size:
        return Analysis(colour, None, travel, track)
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Analysis(colour, direction, travel, track)
