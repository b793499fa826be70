"""The shipped model's recipe (``tests/reference/make_shapes_model.py``): its data generator and frame analysis, and
each training stage run for a step or two into folders our converters accept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.reference.shapes import (
    ALL_CAPTIONS,
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    TRAIN_CAPTIONS,
    Caption,
    analyse,
    dataset,
    dataset_motions,
    draw,
    edit,
    edit_pair,
    render,
    sample_motion,
)

torch = pytest.importorskip("torch")


def test_held_out_combinations_are_new_but_their_words_are_trained():
    assert len(ALL_CAPTIONS) == 60 and len(HELD_OUT) == 12
    assert not set(HELD_OUT) & set(TRAIN_CAPTIONS)
    trained = [Caption.parse(c) for c in TRAIN_CAPTIONS]
    for held in map(Caption.parse, HELD_OUT):
        # each word of a held-out caption is in training, with each other word of it, just not all three together
        assert any(t.colour == held.colour and t.shape == held.shape for t in trained)
        assert any(t.colour == held.colour and t.direction == held.direction for t in trained)
        assert any(t.shape == held.shape and t.direction == held.direction for t in trained)


def test_the_generator_is_seeded():
    a, captions_a = dataset(TRAIN_CAPTIONS, 12, seed=3)
    b, captions_b = dataset(TRAIN_CAPTIONS, 12, seed=3)
    c, _ = dataset(TRAIN_CAPTIONS, 12, seed=4)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)
    assert a.shape == (12, 17, 64, 64, 3) and a.dtype == np.uint8


@pytest.mark.parametrize("caption", ALL_CAPTIONS[::7])
def test_the_analysis_reads_colour_and_direction_of_rendered_clips(caption):
    rng = np.random.default_rng(0)
    for _ in range(3):
        clip = render(caption, rng)
        analysis = analyse(clip)
        assert analysis.matches(caption), (caption, analysis.colour, analysis.direction)
        assert not analysis.matches(caption.replace(Caption.parse(caption).direction, "sideways"))
        reversed_clip = analyse(clip[::-1])
        assert reversed_clip.colour == analysis.colour and reversed_clip.direction != analysis.direction


def test_the_analysis_refuses_a_still_or_empty_clip():
    rng = np.random.default_rng(1)
    still = np.repeat(render("a red circle moving up", rng)[:1], 17, axis=0)
    assert analyse(still).direction is None and analyse(still).colour == "red"
    empty = np.zeros((17, 64, 64, 3), np.uint8) + 24
    assert analyse(empty).colour is None and not analyse(empty).matches("a red circle moving up")


def test_every_word_is_drawn():
    assert set(COLOURS) and set(SHAPES) and set(DIRECTIONS)
    with pytest.raises(ValueError, match="not a shapes caption"):
        Caption.parse("a red square")


def test_the_text_and_vae_stages_make_folders_the_converters_take(tmp_path):
    from starflow_mlx.convert.t5 import convert_t5
    from starflow_mlx.convert.wan_vae import convert_wan_vae
    from starflow_mlx.tokenizer import T5Tokenizer
    from tests.reference import train_text, train_vae

    torch.set_num_threads(1)
    train_text.main(["--steps", "2", "--batch", "4", "--out", str(tmp_path / "text")])
    train_vae.main(["--steps", "2", "--batch", "1", "--frames", "5", "--clips", "4", "--out", str(tmp_path / "vae")])
    t5 = convert_t5(tmp_path / "text", tmp_path / "text-mlx")
    tokenizer = T5Tokenizer.from_folder(t5)
    pieces = tokenizer.encode("a red square moving right")
    assert len(pieces) <= 10  # the caption words are whole pieces
    vae_config = json.loads((tmp_path / "vae" / "diffusers" / "config.json").read_text())
    assert vae_config["is_residual"] and vae_config["z_dim"] == train_vae.Z_DIM
    assert len(vae_config["latents_std"]) == train_vae.Z_DIM and min(vae_config["latents_std"]) > 0
    vae = convert_wan_vae(tmp_path / "vae" / "diffusers", tmp_path / "vae-mlx")
    assert json.loads((vae / "config.json").read_text())["temporal_scale"] == 0.6  # STARFlow-V's, as the YAML says
    # the checkpoint a resumed run starts from
    state = torch.load(tmp_path / "vae" / "state.pth", weights_only=True)
    assert state["step"] == 2


@pytest.mark.parametrize("attribute,value", [("colour", "blue"), ("direction", "left"), ("direction", "up"),
                                             ("shape", "circle")])
def test_an_edit_pair_shares_its_motion_and_changes_one_attribute(attribute, value):
    source = "a red square moving right"
    target = edit(source, attribute, value)
    for seed in range(20):
        motion = sample_motion(source, np.random.default_rng(seed))
        before, after = edit_pair(source, target, motion)
        np.testing.assert_array_equal(before, render(source, np.random.default_rng(seed)))
        a, b = analyse(before), analyse(after)
        assert (b.colour, b.direction) == (target.colour, target.direction)
        assert abs(a.travel - b.travel) < 1.5  # the same speed
        inside = (after != np.array(BACKGROUND, np.uint8)).any(-1)
        assert inside.any((1, 2)).all()  # the moved track never leaves the frame
        if attribute != "direction":
            np.testing.assert_allclose(a.track, b.track, atol=0.5)  # the same place, frame by frame
        elif value == "up":  # a perpendicular direction keeps the start where it fits
            assert abs(a.track[0][0] - b.track[0][0]) < 0.5


def test_the_data_with_motions_is_the_dataset():
    clips, captions = dataset(TRAIN_CAPTIONS, 10, seed=3)
    again, captions_again, motions = dataset_motions(TRAIN_CAPTIONS, 10, seed=3)
    np.testing.assert_array_equal(clips, again)
    assert captions == captions_again
    np.testing.assert_array_equal(clips[4], draw(captions[4], motions[4]))
