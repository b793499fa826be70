"""The model shipped in the package really works: trained by ``tests/reference`` (``make_shapes_model``), converted
by ``convert pipeline``, run by the MLX pipeline. Behaviour on held-out captions (combinations never trained on),
checked by a simple analysis of the frames (colour of the moving blob, its centroid track).

Thresholds are what was measured (BENCHMARKS.md, ``benchmarks/bench_shapes.py``) minus a margin; the issue's
floors (80% prompt accuracy, 90% likelihood ranking) are asserted as well.
"""

from __future__ import annotations

import numpy as np
import pytest

from starflow_mlx import Pipeline
from starflow_mlx.cli import main as cli_main
from starflow_mlx.media import probe_media, read_video, to_uint8
from tests.reference.shapes import HELD_OUT, TRAIN_CAPTIONS, analyse, render
from tests.shapes_quality import best_of, kept_first_frame, likelihood_ranking, prompt_accuracy

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def shapes() -> Pipeline:
    return Pipeline.from_pretrained()


def test_the_generate_command_makes_the_prompted_clip(tmp_path):
    out = tmp_path / "clip.mp4"
    assert cli_main(["generate", "a red square moving right", "--out", str(out)]) == 0
    assert (probe_media(out).width, probe_media(out).frames) == (64, 17)
    analysis = analyse(to_uint8(read_video(out, (64, 64), 17).frames.transpose(0, 2, 3, 1)))
    assert (analysis.colour, analysis.direction) == ("red", "right")


def test_held_out_captions_are_followed(shapes):
    accuracy = prompt_accuracy(shapes, HELD_OUT, SEEDS)
    assert accuracy.rate >= 0.8, [(c, a.colour, a.direction) for c, a in accuracy.analyses if not a.matches(c)]


def test_training_captions_are_followed(shapes):
    accuracy = prompt_accuracy(shapes, TRAIN_CAPTIONS[::8], SEEDS[:1])
    assert accuracy.rate >= 0.8


def test_image_to_video_keeps_the_object_and_moves_it_as_prompted(shapes):
    rng = np.random.default_rng(7)
    kept = moved = 0
    for caption in HELD_OUT[::2]:
        first = render(caption, rng)[0]
        clip = to_uint8(shapes.image_to_video(caption, first, seed=0).frames[0])
        kept += kept_first_frame(first, clip)
        moved += analyse(clip).matches(caption)
    assert kept >= 5 and moved >= 5, (kept, moved)


def test_the_true_caption_is_more_likely_than_a_wrong_one(shapes):
    wins, total, rows = likelihood_ranking(shapes, HELD_OUT, seed=3)
    assert wins >= 0.9 * total, rows


def test_best_of_n_by_likelihood_is_at_least_as_accurate_as_one_sample(shapes):
    single = best = 0
    for caption in HELD_OUT[:6]:
        first, chosen = best_of(shapes, caption, range(3))
        single += first.matches(caption)
        best += chosen.matches(caption)
    assert best >= single and best >= 5, (single, best)
