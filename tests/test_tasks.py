"""The conditioned tasks (issue 12) on the shipped model, mechanics only (no accuracy, no model-specific sample
value: ``tests/test_shapes_tasks.py`` measures what the model does with them):

- ``edit`` ("(v2v) "), ``last`` ("(last) ") and ``extend`` ("(extend) "): the flow's sampled sequence and which of
  its latent frames are given and which are the output, the templated prompt, the prefix latent against the
  VAE-encoded source, the output clip against the VAE's decode of its latent frames, the task-aware sliding window,
  seeds, several samples, low memory, a quantized KV cache, the planner, misuse as one line, a prompt too long
  once the marker is added;
- ``inversion`` (``inversion_edit``): the round trip, what strength 0, between and 1 mean, guidance, ``kv_bits``,
  the solver, low memory, the plan, and every bad request as one line (a clip that needs the sliding window
  included: the forward pass does not invert it, so it is refused before any event).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlx.core as mx

from starflow_mlx import media, memory
from starflow_mlx.pipeline import FramesDecoded, Pipeline, StageStarted
from starflow_mlx.sampler import SEQUENTIAL, SamplerOptions, WindowMoved, sample, stream_denoise
from tests.helpers import maxerr, refusal

PROMPT = "a blue square moving right"
SOURCE = "a red square moving right"
TOLERANCE = 1e-5  # the same float32 computation done twice, by the pipeline and here
ROUND_TRIP = 1e-4  # the sequential inverse of the flow's forward pass, float32 (the bound)
MARKERS = {"edit": "(v2v) ", "last": "(last) ", "extend": "(extend) "}


@pytest.fixture(scope="module")
def shapes() -> Pipeline:
    return Pipeline.from_pretrained(dtype="float32")


@pytest.fixture(scope="module")
def low() -> Pipeline:
    return Pipeline.from_pretrained(dtype="float32", low_memory=True)


def square_clip(frames: int = 17, colour=(230, 30, 30)) -> np.ndarray:
    """(frames, 64, 64, 3) uint8: a square moving right on black, as the shipped model was trained on."""
    clip = np.zeros((frames, 64, 64, 3), np.uint8)
    for t in range(frames):
        x = 4 + 2 * t
        clip[t, 24:40, x : x + 16] = colour
    return clip


def seed_keys(seed: int):
    """The keys a generation of ``seed`` draws from (``Pipeline._events``): noise, σ noise, VAE posterior."""
    return mx.random.split(mx.random.key(seed), 3)


def encoded(pipeline: Pipeline, pixels: np.ndarray, seed: int) -> mx.array:
    """``pixels`` (T, H, W, 3) uint8 encoded as one clip by the VAE with the posterior key of ``seed``."""
    prepared = np.stack([media.prepare_image(frame, (64, 64)) for frame in pixels])
    return pipeline.vae.to_flow_latent(mx.array(prepared)[None], key=seed_keys(seed)[2])


def noised(pipeline: Pipeline, latent: mx.array, seed: int) -> mx.array:
    return latent + pipeline.flow_config.noise_std * mx.random.normal(latent.shape, key=seed_keys(seed)[1])


def decoded(pipeline: Pipeline, latent: mx.array) -> np.ndarray:
    """``latent`` (B, T, C, h, w) decoded as a clip of its own, clipped as ``Generation.frames``."""
    pixels = [np.array(pipeline.vae.from_flow_latent(latent[i : i + 1]).transpose(0, 1, 3, 4, 2))
              for i in range(latent.shape[0])]
    return np.clip(np.concatenate(pixels), -1, 1)


def run(pipeline: Pipeline, task: str, prompt: str = PROMPT, **arguments):
    """(result, events) of one generation; ``image`` / ``video`` default to the square clip or its last frame,
    inversion's ``source_prompt`` to ``SOURCE``."""
    if task == "last":
        arguments.setdefault("image", square_clip()[-1])
    else:
        arguments.setdefault("video", square_clip(arguments.get("frames", 17)))
    if task == "inversion":
        arguments.setdefault("source_prompt", SOURCE)
    events = list(pipeline.stream(prompt, task, **arguments))
    return events[-1].result, events


def stages(events) -> list[tuple[str, int | None]]:
    return [(e.stage, e.total) for e in events if isinstance(e, StageStarted)]


def decoded_frames(events) -> list[tuple[int, int, int]]:
    return [(e.start, e.stop, e.total) for e in events if isinstance(e, FramesDecoded)]


# ----------------------------------------------------------------------------------------------------------------
# What each task samples and outputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edited(shapes):
    return run(shapes, "edit", jacobi=False, seed=4)


def test_edit_samples_the_target_after_the_encoded_source_and_outputs_the_target_alone(shapes, edited):
    result, events = edited
    assert result.frames.shape == (1, 17, 64, 64, 3)
    assert result.sampled.shape == (1, 10, 16, 4, 4)  # 5 source + 5 target latent frames
    assert result.latent.shape == (1, 5, 16, 4, 4)  # the output's: the target alone
    record = result.record
    assert (record["task"], record["given_frames"], record["frames"], record["prefix_frames"]) == ("edit", 17, 17, 5)
    assert record["latent_shape"] == [1, 10, 16, 4, 4]
    assert stages(events) == [("text", 2), ("prefix", 1), ("sample", 10), ("denoise", 10), ("decode", 1)]
    # the prefix is the source encoded and σ-noised, kept by the sampler (exactly, up to float32, sequentially)
    assert maxerr(result.given, noised(shapes, encoded(shapes, square_clip(), 4), 4)) <= TOLERANCE
    assert maxerr(result.sampled[:, :5], result.given) <= ROUND_TRIP
    # the denoiser runs over the whole sequence (the source as context); the output is its target part
    settings = shapes.settings(jacobi=False, seed=4)
    text = shapes._encode([record["prompt_templated"]])
    window = shapes._denoise_window(result.sampled, settings, "edit")
    denoised = list(stream_denoise(shapes.flow, result.sampled, text, window))[-1].latent
    assert maxerr(result.latent, denoised[:, 5:]) <= TOLERANCE
    # decoded as a clip of its own (its first latent frame an image latent), 17 frames once each, in order
    assert maxerr(result.frames, decoded(shapes, result.latent)) <= TOLERANCE
    pieces = decoded_frames(events)
    assert pieces[0][0] == 0 and pieces[-1][1:] == (17, 17)
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


def test_edit_templates_the_v2v_marker_and_guides_against_the_bare_template(shapes, edited):
    record = edited[0].record
    settings = shapes.settings()
    assert record["prompt"] == PROMPT
    assert record["prompt_templated"] == shapes.template("(v2v) " + PROMPT, settings)
    assert record["prompt_templated"].count("(v2v) ") == 1
    # training dropped the whole caption, marker included: the unconditional prompt is the bare template
    assert record["prompt_unconditional"] == shapes.template("", settings)
    # the record's bits/dim are the sampled sequence's under the marked prompt
    text = shapes._encode([record["prompt_templated"]])
    expected = float(np.array(shapes.flow(edited[0].sampled, text).bits_per_dim())[0])
    assert record["bits_per_dim"][0] == pytest.approx(expected, abs=1e-5)


def test_edit_reads_the_source_from_its_start(shapes, edited):
    later = np.full((8, 64, 64, 3), 200, np.uint8)  # frames after the 17th play no part
    again, _ = run(shapes, "edit", video=np.concatenate([square_clip(), later]), jacobi=False, seed=4)
    assert np.array_equal(again.frames, edited[0].frames)
    shifted, _ = run(shapes, "edit", video=np.concatenate([later, square_clip()]), jacobi=False, seed=4)
    assert maxerr(shifted.given, edited[0].given) > 0.1  # the start is what is read


def test_last_frame_puts_the_image_latent_first_and_outputs_the_clip_after_it(shapes):
    image = square_clip()[-1]
    result, events = run(shapes, "last", image=image, jacobi=False, denoise=False, seed=2)
    assert result.frames.shape == (1, 17, 64, 64, 3)
    assert result.sampled.shape == (1, 6, 16, 4, 4) and result.latent.shape == (1, 5, 16, 4, 4)
    record = result.record
    assert (record["task"], record["given_frames"], record["prefix_frames"]) == ("last", 1, 1)
    assert record["prompt_templated"] == shapes.template("(last) " + PROMPT, shapes.settings())
    assert stages(events) == [("text", 2), ("prefix", 1), ("sample", 6), ("decode", 1)]
    assert maxerr(result.given, noised(shapes, encoded(shapes, image[None], 2), 2)) <= TOLERANCE
    assert maxerr(result.sampled[:, :1], result.given) <= ROUND_TRIP
    assert np.array_equal(np.array(result.latent), np.array(result.sampled[:, 1:]))  # no denoising: the sample
    assert maxerr(result.frames, decoded(shapes, result.latent)) <= TOLERANCE


def test_extend_continues_the_clip_after_its_image_latent_and_outputs_the_whole_clip(shapes):
    clip = square_clip()
    result, events = run(shapes, "extend", video=clip, given_frames=9, jacobi=False, seed=3)
    assert result.frames.shape == (1, 17, 64, 64, 3)
    assert result.sampled.shape == (1, 4, 16, 4, 4)  # the clip's 5 latent frames but its first
    assert result.latent.shape == (1, 5, 16, 4, 4)  # the output: the given first latent frame, then the sequence
    record = result.record
    assert (record["task"], record["given_frames"], record["prefix_frames"]) == ("extend", 9, 2)
    assert record["latent_shape"] == [1, 4, 16, 4, 4]
    assert record["prompt_templated"] == shapes.template("(extend) " + PROMPT, shapes.settings())
    assert stages(events)[2] == ("sample", 4)
    given = encoded(shapes, clip[-9:], 3)  # the last 9 frames: 3 latent frames, the first one not continued
    assert maxerr(result.given, noised(shapes, given[:, 1:], 3)) <= TOLERANCE
    assert maxerr(result.sampled[:, :2], result.given) <= ROUND_TRIP
    # one causal stream: the given clip's first latent frame as encoded (no σ noise), then the denoised sequence
    assert maxerr(result.latent[:, :1], given[:, :1]) <= TOLERANCE
    assert maxerr(result.frames, decoded(shapes, result.latent)) <= TOLERANCE
    assert maxerr(result.frames[:, :1], decoded(shapes, given[:, :1])) <= TOLERANCE  # the given first frame back


def test_a_long_extension_slides_the_window_over_the_tasks_training_sequence(shapes):
    result, events = run(shapes, "extend", video=square_clip(33), given_frames=9, frames=33, denoise=False, seed=1)
    assert result.frames.shape == (1, 33, 64, 64, 3)
    assert result.sampled.shape[1] == 8 and result.latent.shape[1] == 9
    # extend is trained on the 5-latent-frame clip: 8 frames slide a window of 5 from the 2 given, moving by one
    # (context_length 16, capped at window - 1)
    moves = [(e.first_frame, e.overlap) for e in events if isinstance(e, WindowMoved)]
    assert moves == [(1, 4), (2, 4), (3, 4)]
    assert result.record["sampler"]["3"]["reencodes"] == 3
    assert maxerr(result.frames, decoded(shapes, result.latent)) <= TOLERANCE


@pytest.mark.parametrize("task, frames, window", [
    ("t2v", 5, None), ("t2v", 6, 5), ("edit", 10, None), ("edit", 12, 10), ("last", 6, None), ("last", 7, 6),
    ("extend", 5, None), ("extend", 8, 5), ("inversion", 5, None), ("inversion", 6, 5),
], ids=["t2v-trained", "t2v-longer", "edit-source-and-target", "edit-longer", "last-trained", "last-longer",
        "extend-trained", "extend-longer", "inversion-trained", "inversion-longer"])
def test_the_window_covers_the_tasks_training_sequence(shapes, task, frames, window):
    """The shipped model has no window of its own and 5 latent frames per training clip: an edit was trained on 10
    (source and target), last on 6 (the image, then the clip); a longer sequence slides a window of that length."""
    noise = mx.zeros((1, frames, 16, 4, 4))
    expected = {} if window is None else {"window": window, "overlap": min(16, window - 1)}
    assert shapes._window(noise, shapes.settings(), task) == expected
    assert shapes._window(noise, shapes.settings(window=3, context_length=1), task) == {"window": 3, "overlap": 1}
    assert memory.sampled_frames(task, 5) == {"edit": 10, "last": 6, "extend": 4}.get(task, 5)


# ----------------------------------------------------------------------------------------------------------------
# Seeds and the generation options
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["edit", "last", "extend", "inversion"])
def test_the_same_seed_repeats_and_another_differs(shapes, task):
    options = {"strength": 0.5} if task == "inversion" else {}
    first, again, other = (run(shapes, task, frames=9, denoise=False, seed=seed, **options)[0] for seed in (5, 5, 6))
    assert np.array_equal(first.frames, again.frames)
    assert np.array_equal(np.array(first.given), np.array(again.given))
    assert np.abs(first.frames - other.frames).max() > 0.01
    assert maxerr(first.given, other.given) > 0.01  # the posterior sample and σ noise come from the seed too


def test_two_samples_share_the_prefix_and_differ_after_it(shapes):
    result, _ = run(shapes, "edit", frames=9, num_samples=2, denoise=False, jacobi=False, seed=1)
    assert result.frames.shape == (2, 9, 64, 64, 3) and result.given.shape == (2, 3, 16, 4, 4)
    assert result.sampled.shape == (2, 6, 16, 4, 4)
    assert np.array_equal(np.array(result.given[0]), np.array(result.given[1]))
    assert maxerr(result.sampled[:, :3], result.given) <= ROUND_TRIP
    assert np.abs(result.frames[0] - result.frames[1]).max() > 0.01
    assert maxerr(result.frames, decoded(shapes, result.latent)) <= TOLERANCE  # each sample its own decode
    extended, _ = run(shapes, "extend", frames=9, num_samples=2, denoise=False, seed=1)
    assert np.array_equal(np.array(extended.latent[0, 0]), np.array(extended.latent[1, 0]))  # the same lead frame
    assert np.abs(extended.frames[0, 5:] - extended.frames[1, 5:]).max() > 0.01


@pytest.mark.parametrize("task", ["edit", "last", "extend"])
def test_low_memory_gives_the_same_clip(shapes, low, task):
    assert np.array_equal(run(low, task, frames=9, seed=2)[0].frames, run(shapes, task, frames=9, seed=2)[0].frames)
    assert low.loaded_parts == ()


def test_a_quantized_kv_cache_and_no_guidance(shapes):
    quantized, _ = run(shapes, "edit", frames=9, kv_bits=8, denoise=False, seed=1)
    plain, _ = run(shapes, "edit", frames=9, denoise=False, seed=1)
    assert quantized.record["settings"]["kv_bits"] == 8 and quantized.frames.shape == (1, 9, 64, 64, 3)
    assert np.array_equal(np.array(quantized.given), np.array(plain.given))  # the same prefix latent
    assert maxerr(quantized.frames, plain.frames) > 0  # the cache's rounding, through the prefix and the target
    unguided, events = run(shapes, "last", frames=9, guidance=0, denoise=False, seed=1)
    assert unguided.record["prompt_unconditional"] is None and unguided.frames.shape == (1, 9, 64, 64, 3)
    assert stages(events)[0] == ("text", 1)
    guided, _ = run(shapes, "last", frames=9, denoise=False, seed=1)
    assert maxerr(unguided.frames, guided.frames) > 0


# ----------------------------------------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, frames, given_frames, latent_frames, window", [
    ("edit", 17, None, 10, None), ("last", 17, None, 6, None), ("extend", 17, None, 4, None),
    ("extend", 33, 9, 8, 5), ("edit", 33, None, 18, 10), ("inversion", 17, None, 5, None),
], ids=["edit", "last", "extend", "extend-long", "edit-long", "inversion"])
def test_plan_samples_the_tasks_sequence(shapes, task, frames, given_frames, latent_frames, window):
    plan = shapes.plan(task, frames=frames, given_frames=given_frames)
    assert plan.shape["latent_frames"] == latent_frames and plan.shape["window"] == window
    assert plan.shape["frames"] == frames  # the output clip
    assert [s.stage for s in plan.stages][:3] == ["text", "prefix", "sample"]
    t2v = shapes.plan("t2v", frames=frames)
    if latent_frames > t2v.shape["latent_frames"]:
        assert plan.stage("sample").peak > t2v.stage("sample").peak


@pytest.mark.parametrize("task, overrides", [
    ("edit", {}), ("last", {}), ("extend", {}), ("extend", {"frames": 9}), ("extend", {"given_frames": 5}),
    ("extend", {"frames": 33, "given_frames": 9}), ("edit", {"frames": 9}), ("inversion", {"frames": 9}),
], ids=["edit", "last", "extend", "extend-9-frames", "extend-given-5", "extend-long", "edit-9-frames",
        "inversion-9-frames"])
def test_plan_and_generation_agree_on_the_sequence(shapes, task, overrides):
    """The planner's sequence, prefix and window are the generation's (an extension of 9 frames gives 5 of them:
    planned without a prefix before the fix in ``memory.given_frames``)."""
    plan = shapes.plan(task, **overrides)
    result, events = run(shapes, task, denoise=False, **overrides)
    assert plan.shape["latent_frames"] == result.record["latent_shape"][1] == result.sampled.shape[1]
    prefix = memory._shape(memory.from_folder(shapes.folder.root), plan.request).given
    assert prefix == (result.record["prefix_frames"] or 0)
    assert ("prefix" in [s.stage for s in plan.stages]) == ("prefix" in [s for s, _ in stages(events)])
    settings = shapes.settings(frames=result.record["settings"]["frames"])
    assert plan.shape["window"] == shapes._window(result.sampled, settings, task).get("window")


def test_plan_refuses_what_generation_refuses(shapes):
    assert refusal(lambda: shapes.plan("edit", given_frames=5)) == (
        "given_frames is an argument of video_to_video and extend, not of task edit")
    assert "given_frames 1: extend needs at least 5 frames" in refusal(lambda: shapes.plan("extend", given_frames=1))
    assert "given_frames 6 must be 1 + 4k frames" in refusal(lambda: shapes.plan("extend", given_frames=6))
    assert "frames 5: extend needs a longer clip, at least 9 frames" in refusal(lambda: shapes.plan("extend", frames=5))
    assert "needs the deep block's sliding window" in refusal(lambda: shapes.plan("inversion", frames=33))
    assert "needs the deep block's sliding window" in refusal(lambda: shapes.plan("inversion", window=2))
    assert shapes.plan("inversion", window=5).shape["window"] is None  # a window holding the clip never moves


# ----------------------------------------------------------------------------------------------------------------
# Misuse: one line naming the problem, raised before the first event
# ----------------------------------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "edit-source-too-short": ("edit", {"video": square_clip(9)}, "video has 9 frames, 17 are needed"),
    "edit-without-video": ("edit", {}, "task edit needs a video"),
    "edit-given-an-image": ("edit", {"image": square_clip()[0]}, "task edit takes no image"),
    "edit-given-frames": ("edit", {"video": square_clip(), "given_frames": 5},
                          "given_frames is an argument of video_to_video and extend, not of task edit"),
    "last-given-a-video": ("last", {"video": square_clip()}, "task last takes no video"),
    "last-without-image": ("last", {}, "task last needs an image"),
    "last-image-shape": ("last", {"image": square_clip()}, "image must be (H, W, 3) pixels, got shape [17, 64, 64, 3]"),
    "extend-without-video": ("extend", {}, "task extend needs a video"),
    "extend-given-all": ("extend", {"video": square_clip(), "given_frames": 17},
                         "given_frames 17 must be 1 + 4k frames and fewer than frames 17"),
    "extend-given-one": ("extend", {"video": square_clip(), "given_frames": 1},
                         "given_frames 1: extend needs at least 5 frames"),
    "extend-given-not-decodable": ("extend", {"video": square_clip(), "given_frames": 6},
                                   "given_frames 6 must be 1 + 4k frames"),
    "extend-too-short-a-clip": ("extend", {"video": square_clip(), "frames": 5},
                                "frames 5: extend needs a longer clip, at least 9 frames"),
    "extend-source-too-short": ("extend", {"video": square_clip(5), "given_frames": 9},
                                "video has 5 frames, 9 are needed"),
    "extend-given-from": ("extend", {"video": square_clip(), "given_from": "start"},
                          "given_from is an argument of video_to_video, not of task extend"),
    "t2v-given-frames": ("t2v", {"given_frames": 5},
                         "given_frames is an argument of video_to_video and extend, not of task t2v"),
    "last-given-from": ("last", {"image": square_clip()[0], "given_from": "start"},
                        "given_from is an argument of video_to_video, not of task last"),
    "edit-video-a-list": ("edit", {"video": [[0, 0, 0]]},
                          "video must be a file path or a numpy array of (T, H, W, 3) pixels, got list"),
    "last-image-a-number": ("last", {"image": 5},
                            "image must be a file path or a numpy array of (H, W, 3) pixels, got int"),
    "edit-video-nan": ("edit", {"video": np.full((17, 64, 64, 3), np.nan, np.float32)}, "video holds NaN or inf"),
    "last-image-inf": ("last", {"image": np.full((64, 64, 3), np.inf)}, "image holds NaN or inf"),
    "extend-video-grey": ("extend", {"video": np.zeros((17, 64, 64), np.uint8)},
                          "video must be (T, H, W, 3) pixels, got shape [17, 64, 64]"),
    "extend-given-frames-text": ("extend", {"video": square_clip(), "given_frames": "5"},
                                 "given_frames must be an integer >= 1, got str '5'"),
    "extend-given-frames-bool": ("extend", {"video": square_clip(), "given_frames": True},
                                 "given_frames must be an integer >= 1, got bool True"),
    "i2v-given-a-video": ("i2v", {"image": square_clip()[0], "video": square_clip()}, "task i2v takes no video"),
    "edit-source-prompt": ("edit", {"video": square_clip(), "source_prompt": SOURCE},
                           "source_prompt is an argument of inversion editing, not of task edit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_misuse_is_one_line_before_any_event(shapes, case):
    task, arguments, words = BAD_REQUESTS[case]
    message = refusal(lambda: shapes.stream(PROMPT, task, **arguments))  # raised by the call: no event yet
    assert words in message, message


def test_a_missing_source_file_is_refused_naming_it(shapes, tmp_path):
    missing = tmp_path / "source.mp4"
    assert refusal(lambda: shapes.stream(PROMPT, "edit", video=missing), media.MediaError) == f"{missing}: no such file"


@pytest.mark.parametrize("task", ["edit", "last", "extend"])
def test_a_prompt_too_long_with_the_marker_is_refused_naming_it(shapes, task):
    settings = shapes.settings()
    window = shapes.flow_config.txt_size
    caption = PROMPT
    while len(shapes.tokenizer.encode(shapes.template(caption + " x", settings))) + 1 <= window:
        caption += " x"  # the longest caption that fits without the marker
    assert shapes.text_to_video(caption, frames=5, denoise=False).frames.shape[1] == 5
    media_argument = {"image": square_clip()[0]} if task == "last" else {"video": square_clip()}
    message = refusal(lambda: shapes.stream(caption, task, **media_argument))
    tokens = len(shapes.tokenizer.encode(shapes.template(MARKERS[task] + caption, settings))) + 1
    assert tokens > window
    assert message == (f"prompt is too long: {tokens} tokens with the prompt template, and the model reads "
                       f"{window}; shorten it")


@pytest.mark.parametrize("task", ["edit", "last", "extend", "inversion"])
def test_an_image_pipeline_has_no_conditioned_tasks(folders, task):
    image = Pipeline.from_pretrained(folders["t2i"])
    argument = {"image": np.zeros((8, 8, 3), np.uint8)} if task == "last" else {
        "video": np.zeros((1, 8, 8, 3), np.uint8)}
    if task == "inversion":
        argument["source_prompt"] = SOURCE
    message = refusal(lambda: image.stream(PROMPT, task, **argument))
    assert message == f"task {task} needs a video pipeline; this one makes images"


# ----------------------------------------------------------------------------------------------------------------
# Inversion editing
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def same_caption(shapes):
    """The round trip: inverted and sampled back under the source's own caption, strength 0."""
    events = []
    result = shapes.inversion_edit(SOURCE, square_clip(), source_prompt=SOURCE, seed=4, progress=events.append)
    return result, events


def test_the_round_trip_reproduces_the_source_latent(shapes, same_caption):
    result, events = same_caption
    assert result.frames.shape == (1, 17, 64, 64, 3)
    assert result.given.shape == result.sampled.shape == result.latent.shape == (1, 5, 16, 4, 4)
    assert maxerr(result.sampled, result.given) <= ROUND_TRIP
    # the text stage encodes the prompt, the unconditional prompt and the source prompt
    assert stages(events) == [("text", 3), ("prefix", 1), ("sample", 5), ("denoise", 5), ("decode", 1)]
    # the source latent: the clip's VAE posterior and σ noise from the seed's keys (as a prefix's)
    assert maxerr(result.given, noised(shapes, encoded(shapes, square_clip(), 4), 4)) <= TOLERANCE
    assert maxerr(result.frames, decoded(shapes, result.latent)) <= TOLERANCE


def test_the_record_names_the_source_and_the_strength(shapes, same_caption):
    record = same_caption[0].record
    assert record["task"] == "inversion" and record["prompt"] == record["source_prompt"] == SOURCE
    assert record["source_prompt_templated"] == shapes.template(SOURCE, shapes.settings())
    assert record["prompt_templated"] == shapes.template(SOURCE, shapes.settings())  # no training marker
    assert record["strength"] == 0.0 and record["given_frames"] == 17 and record["prefix_frames"] is None
    assert record["settings"]["jacobi"] is False  # the exact inverse unless told
    assert record["sampler"]["3"]["chunks"] == record["sampler"]["3"]["tokens"] == 80  # token by token
    assert set(record["timings"]) == {"text", "prefix", "sample", "denoise", "decode"}


def test_jacobi_is_used_when_asked(shapes):
    """Inversion samples sequentially unless ``jacobi`` is set; set, the block-wise solver runs (and stops within
    its threshold, so the round trip is no longer exact to float precision)."""
    result = shapes.inversion_edit(SOURCE, square_clip(), source_prompt=SOURCE, seed=4, jacobi=True, denoise=False)
    assert result.record["settings"]["jacobi"] is True
    deep = result.record["sampler"]["3"]
    assert deep["chunks"] < deep["tokens"] and deep["max_iterations"] > 1


@pytest.mark.parametrize("guidance", [0.0, 1.0, 3.0])
def test_the_round_trip_holds_with_and_without_guidance_for_every_sample(shapes, guidance):
    result = shapes.inversion_edit(SOURCE, square_clip(9), source_prompt=SOURCE, seed=3, frames=9,
                                   guidance=guidance, num_samples=2, denoise=False)
    assert result.sampled.shape == result.given.shape == (2, 3, 16, 4, 4)
    assert maxerr(result.sampled, result.given) <= ROUND_TRIP
    assert (result.record["prompt_unconditional"] is None) == (guidance == 0)


def test_the_forward_must_be_guided_as_the_sampler_is(shapes):
    """Why the forward runs on [cond; uncond] rows: the sampler's guided inverse of an unguided forward's noise is
    not the source."""
    result = shapes.inversion_edit(SOURCE, square_clip(9), source_prompt=SOURCE, seed=3, frames=9, denoise=False)
    settings = shapes.settings(seed=3, frames=9, jacobi=False)
    text = shapes._encode([shapes.template(SOURCE, settings)])
    text_null = shapes._encode([shapes.template("", settings)])
    unguided = shapes.flow(result.given, text).z
    options = SamplerOptions(guidance=settings.guidance, solver=SEQUENTIAL, stream_frames=True)
    assert maxerr(sample(shapes.flow, unguided, text, text_null, options), result.given) > 100 * ROUND_TRIP
    assert maxerr(result.sampled, result.given) <= ROUND_TRIP  # the pipeline's guided forward


def test_a_window_holding_the_whole_clip_round_trips(shapes, same_caption):
    """A ``window`` of at least the clip's latent frames never moves: inversion runs (it was refused before the fix
    in ``Pipeline._check_inversion_length``) and gives the whole-clip result."""
    plain = shapes.inversion_edit(SOURCE, square_clip(), source_prompt=SOURCE, seed=4, denoise=False)
    for window in (5, 8):
        result = shapes.inversion_edit(SOURCE, square_clip(), source_prompt=SOURCE, seed=4, window=window,
                                       denoise=False)
        assert result.record["sampler"]["3"]["reencodes"] == 0
        assert maxerr(result.sampled, result.given) <= ROUND_TRIP
        assert maxerr(result.sampled, plain.sampled) <= TOLERANCE


def test_strength_one_is_text_to_video_with_the_same_seed(shapes):
    edited = shapes.inversion_edit(PROMPT, square_clip(9), source_prompt=SOURCE, strength=1, seed=9, frames=9,
                                   denoise=False)
    fresh = shapes.text_to_video(PROMPT, seed=9, frames=9, jacobi=False, denoise=False)
    assert np.array_equal(edited.frames, fresh.frames)
    assert np.array_equal(np.array(edited.sampled), np.array(fresh.sampled))
    assert edited.record["strength"] == 1.0


@pytest.mark.parametrize("strength", [0.0, 0.6], ids=["strength-0", "strength-0.6"])
def test_the_noise_sampled_is_the_sources_mixed_with_fresh_noise(shapes, strength):
    """What the sample was drawn from, recovered by the forward under the prompt: sqrt(1 - s²)·z + s·ε, z the
    source's noise under its caption, ε the seed's noise."""
    seed = 5
    result = shapes.inversion_edit(PROMPT, square_clip(9), source_prompt=SOURCE, strength=strength, seed=seed,
                                   frames=9, denoise=False)
    settings = shapes.settings(seed=seed, frames=9)
    text_null = shapes._encode([shapes.template("", settings)])

    def noise_of(latent, caption):
        text = shapes._encode([shapes.template(caption, settings)])
        rows = shapes.flow.guided_text(text, text_null, settings.guidance)
        return shapes.flow(mx.concatenate([latent, latent]), rows, settings.guidance).z[:1]

    epsilon = mx.random.normal(result.sampled.shape, key=seed_keys(seed)[0])
    expected = math.sqrt(1 - strength**2) * noise_of(result.given, SOURCE) + strength * epsilon
    assert maxerr(noise_of(result.sampled, PROMPT), expected) <= ROUND_TRIP
    assert maxerr(result.sampled, result.given) > 1e-2  # another caption: another latent
    assert result.record["strength"] == strength


def test_a_quantized_kv_cache_samples_through_its_rounding(shapes):
    """The forward runs with float caches, the sampler with ``kv_bits``: the round trip then carries the cache's
    rounding (it is exact with a float cache)."""
    result = shapes.inversion_edit(SOURCE, square_clip(9), source_prompt=SOURCE, seed=3, frames=9, kv_bits=8,
                                   denoise=False)
    assert result.record["settings"]["kv_bits"] == 8
    plain = shapes.inversion_edit(SOURCE, square_clip(9), source_prompt=SOURCE, seed=3, frames=9, denoise=False)
    assert np.array_equal(np.array(result.given), np.array(plain.given))
    assert maxerr(result.sampled, result.given) > maxerr(plain.sampled, plain.given)


def test_low_memory_loads_each_part_for_its_stages_and_edits_the_same(shapes, low):
    loaded = []
    result = low.inversion_edit(PROMPT, square_clip(9), source_prompt=SOURCE, strength=0.5, seed=1, frames=9,
                                denoise=False, progress=lambda e: loaded.append((e.stage, low.loaded_parts))
                                if isinstance(e, StageStarted) else None)
    eager = shapes.inversion_edit(PROMPT, square_clip(9), source_prompt=SOURCE, strength=0.5, seed=1, frames=9,
                                  denoise=False)
    assert np.array_equal(result.frames, eager.frames)
    # the VAE leaves after the prefix stage (sampling starts without it) until the first frame is decoded; the
    # flow after sampling
    assert loaded == [("text", ()), ("prefix", ()), ("sample", ("flow",)), ("decode", ("vae",))]
    assert low.loaded_parts == ()


def test_plan_has_the_source_forward_and_the_sequential_solver(shapes):
    plan = shapes.plan("inversion", backend="cpu")
    assert [s.stage for s in plan.stages][:3] == ["text", "prefix", "sample"]
    source = {t.name for t in plan.stage("prefix").terms}
    assert {"VAE encode", "KV cache (scoring)", "activations", "block outputs"} <= source
    shape = memory._shape(memory.from_folder(shapes.folder.root), plan.request)
    assert shape.chunk_later == shape.chunk_first == 1  # sequential
    assert plan.request.jacobi is False
    assert plan.shape["tokens_per_frame"] == 16 and plan.shape["latent_frames"] == 5
    assert shapes.plan("inversion", jacobi=True).request.jacobi is True


CLIP = square_clip()
BAD_INVERSIONS = {
    "missing-source-prompt": ("inversion", {"source_prompt": None},
                              "inversion editing needs source_prompt: the caption of the given clip"),
    "source-prompt-not-text": ("inversion", {"source_prompt": 3},
                               "source_prompt must be a prompt (str), got int"),
    "source-prompt-too-long": ("inversion", {"source_prompt": "red " * 40}, "source_prompt is too long"),
    "strength-above-1": ("inversion", {"strength": 1.5}, "strength must be <= 1.0, got 1.5"),
    "strength-negative": ("inversion", {"strength": -0.1}, "strength must be >= 0.0, got -0.1"),
    "strength-nan": ("inversion", {"strength": float("nan")}, "strength must be a finite number, got float nan"),
    "strength-text": ("inversion", {"strength": "0.5"}, "strength must be a finite number, got str"),
    "strength-bool": ("inversion", {"strength": True}, "strength must be a finite number, got bool"),
    "source-too-short": ("inversion", {"video": CLIP[:9]}, "video has 9 frames, 17 are needed"),
    "source-not-a-clip": ("inversion", {"video": CLIP[0]}, "video must be (T, H, W, 3) pixels, got shape [64, 64, 3]"),
    "no-video": ("inversion", {"video": None}, "task inversion needs a video"),
    "with-an-image": ("inversion", {"image": CLIP[0]}, "task inversion takes no image"),
    "with-given-frames": ("inversion", {"given_frames": 5},
                          "given_frames is an argument of video_to_video and extend, not of task inversion"),
    "with-given-from": ("inversion", {"given_from": "start"},
                        "given_from is an argument of video_to_video, not of task inversion"),
    "source-prompt-on-t2v": ("t2v", {"source_prompt": SOURCE},
                             "source_prompt is an argument of inversion editing, not of task t2v"),
    "strength-on-v2v": ("v2v", {"video": CLIP, "strength": 0.5},
                        "strength is an argument of inversion editing, not of task v2v"),
    "longer-than-trained": ("inversion", {"video": square_clip(33), "frames": 33},
                            "frames 33: inversion editing of 9 latent frames needs the deep block's sliding window"),
    "window-shorter-than-the-clip": ("inversion", {"window": 2}, "window 2: inversion editing of 5 latent frames "
                                     "needs the deep block to see the whole clip"),
}


@pytest.mark.parametrize("case", BAD_INVERSIONS)
def test_a_bad_inversion_request_is_one_line_before_any_event(shapes, case):
    task, arguments, words = BAD_INVERSIONS[case]
    if task == "inversion":
        arguments = {"video": CLIP, "source_prompt": SOURCE, **arguments}
    message = refusal(lambda: shapes.stream(PROMPT, task, **arguments))  # raised by the call: no event yet
    assert words in message, message


def test_inversion_edit_refuses_before_any_event(shapes):
    events = []
    message = refusal(lambda: shapes.inversion_edit(PROMPT, CLIP, source_prompt=SOURCE, strength=2,
                                                    progress=events.append))
    assert message == "strength must be <= 1.0, got 2" and events == []
