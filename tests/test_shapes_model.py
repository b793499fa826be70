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
from tests.shapes_quality import best_of, kept_first_frame, likelihood_ranking, mean_bits_per_dim, prompt_accuracy

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


@pytest.fixture(scope="module")
def shapes_float32() -> Pipeline:
    return Pipeline.from_pretrained(dtype="float32")


# Quantized from the float32-cast weights (float16 scales make MLX's CPU quantized matmul ~15x slower), compared
# with that float32 model.
@pytest.mark.parametrize("bits, max_delta, min_rate", [(8, 0.003, 0.8), (4, 0.02, 0.8)], ids=["8-bit", "4-bit"])
def test_quantized_versions_stay_within_what_was_measured(bits, max_delta, min_rate, shapes_float32):
    quantized = Pipeline.from_pretrained(dtype="float32", q_bits=bits)
    delta = mean_bits_per_dim(quantized, HELD_OUT, 1) - mean_bits_per_dim(shapes_float32, HELD_OUT, 1)
    assert abs(delta) <= max_delta, delta
    assert prompt_accuracy(quantized, HELD_OUT, SEEDS[:1]).rate >= min_rate


def test_the_shipped_folder_is_small_and_records_its_training():
    from starflow_mlx.hub import default_model, read_pipeline_folder

    root = default_model()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    folder = read_pipeline_folder(root)
    provenance = folder.provenance
    assert len(provenance["checkpoint_sha256"]) == 64 and int(provenance["checkpoint_sha256"], 16) >= 0
    commands = provenance["training_commands"]
    for module in ("train_text", "train_vae", "shapes_data", "tests.reference.train "):
        assert any(module in c for c in commands.values()), module
    assert folder.config.guidance == 3.0 and folder.flow_config.txt_size == 24
