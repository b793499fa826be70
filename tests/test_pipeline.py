"""``Pipeline`` end to end on tiny converted pipelines (random weights, every part real: T5 and its tokenizer, the
flow with Jacobi and its denoiser, the Wan / SD VAE): T2V, T2I, I2V, V2V continuation, long video, likelihood;
events, records, seeds (across processes), cancellation, and every bad setting as one line naming it."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402

from starflow_mlx.pipeline import (  # noqa: E402
    STAGES, Cancelled, Generated, Pipeline, Settings, StageFinished, StageStarted,
)
from starflow_mlx.sampler import ChunkSolved, Denoised, Sampled  # noqa: E402
from tests.helpers import REPO, refusal  # noqa: E402

PROMPT = "a red car on a road"


@pytest.fixture(scope="module")
def video(folders) -> Pipeline:
    return Pipeline.from_pretrained(folders["t2v"])


@pytest.fixture(scope="module")
def image(folders) -> Pipeline:
    return Pipeline.from_pretrained(folders["t2i"])


def picture(seed: int = 0, size=(40, 50)) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def stages(events) -> list[tuple[str, str]]:
    return [(type(e).__name__, e.stage) for e in events if isinstance(e, (StageStarted, StageFinished))]


def digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Text to video, text to image
# ----------------------------------------------------------------------------------------------------------------


def test_text_to_video_frames_events_and_record(video):
    events = []
    result = video.text_to_video(PROMPT, progress=events.append, num_samples=2, seed=5)
    assert result.frames.shape == (2, 9, 64, 64, 3) and result.frames.dtype == np.float32
    assert -1 <= result.frames.min() < result.frames.max() <= 1
    assert result.latent.shape == result.sampled.shape == (2, 3, 48, 4, 4) and result.given is None
    assert not np.array_equal(np.array(result.frames[0]), np.array(result.frames[1]))  # two noises, two clips
    assert stages(events) == [(kind, stage) for stage in ("text", "sample", "denoise", "decode")
                              for kind in ("StageStarted", "StageFinished")]
    kinds = [type(e).__name__ for e in events]
    # frames streamed: the last latent frame is sampled before the denoiser can finish, the rest after the sample
    assert kinds.index("FrameSampled") < kinds.index("FramesDenoised") < kinds.index("Sampled")
    assert kinds.index("Sampled") < kinds.index("Denoised") and kinds.count("FramesDecoded") == 3
    assert sum(isinstance(e, ChunkSolved) for e in events) == sum(
        b["chunks"] for b in result.record["sampler"].values())
    assert isinstance(events[-1], Generated) and events[-1].result is result
    sampled = next(e for e in events if isinstance(e, Sampled))
    assert np.array_equal(np.array(sampled.latent), np.array(result.sampled))

    record = result.record
    assert record["task"] == "t2v" and record["prompt"] == PROMPT
    assert record["prompt_templated"] == f"Noise Level 500:\n{PROMPT}"  # the tiny flow: cond_noise_level only
    assert record["prompt_unconditional"] == "Noise Level 500:\n"
    assert record["settings"] == dataclasses.asdict(video.settings(num_samples=2, seed=5))
    assert record["settings"]["guidance"] == 3.5 and record["settings"]["jacobi"] is True
    assert record["size"] == [64, 64] and record["frames"] == 9 and record["latent_shape"] == [2, 3, 48, 4, 4]
    assert set(record["timings"]) == {"text", "sample", "denoise", "decode"}
    assert all(seconds > 0 for seconds in record["timings"].values())
    flow_source = record["model"]["parts"]["flow"]["source"]["files"]
    assert all(len(sha) == 64 for sha in flow_source.values())
    text = video._encode([record["prompt_templated"]] * 2)
    expected_bits = np.array(video.flow(result.sampled, text).bits_per_dim())
    np.testing.assert_allclose(record["bits_per_dim"], expected_bits, rtol=1e-6)
    assert record["version"]


def test_text_to_image_on_an_image_pipeline(image):
    events = []
    result = image.text_to_image(PROMPT, progress=events.append)
    side = 4 * image.vae.spatial_factor  # the flow's 4x4 latent grid through the tiny SD VAE
    assert result.frames.shape == (1, 1, side, side, 3)
    assert result.latent.shape == (1, 4, 4, 4)
    assert -1 <= result.frames.min() < result.frames.max() <= 1
    assert [s for kind, s in stages(events) if kind == "StageStarted"] == ["text", "sample", "denoise", "decode"]
    assert result.record["prompt_templated"] == PROMPT  # STARFlow: the caption as written
    assert result.record["settings"]["learnable_denoiser"] is False  # the gradient step
    denoised = next(e for e in events if isinstance(e, Denoised))
    text = image._encode([PROMPT])
    step = image.flow.gradient_denoise(result.sampled, text, image.flow.config.noise_std)
    np.testing.assert_allclose(np.array(denoised.latent), np.array(step), atol=1e-5)


def test_text_to_image_on_a_video_pipeline_is_one_frame_at_fps_0(video):
    result = video.text_to_image(PROMPT)
    assert result.frames.shape == (1, 1, 64, 64, 3) and result.latent.shape == (1, 1, 48, 4, 4)
    assert result.record["settings"]["frames"] == 1 and result.record["settings"]["fps"] == 0


def test_different_seeds_differ_and_the_same_seed_repeats(video):
    first = video.text_to_video(PROMPT, seed=1, denoise=False)
    again = video.text_to_video(PROMPT, seed=1, denoise=False)
    other = video.text_to_video(PROMPT, seed=2, denoise=False)
    assert np.array_equal(first.frames, again.frames)
    assert np.abs(first.frames - other.frames).max() > 0.01


SAME_SEED_SCRIPT = """
import hashlib, sys
import numpy as np
from starflow_mlx.pipeline import Pipeline
result = Pipeline.from_pretrained(sys.argv[1]).text_to_video("a red car on a road", seed=7)
print(hashlib.sha256(np.ascontiguousarray(result.frames).tobytes()).hexdigest())
"""


def test_same_seed_gives_identical_frames_in_another_process(video, folders):
    run = subprocess.run([sys.executable, "-c", SAME_SEED_SCRIPT, str(folders["t2v"])], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == digest(video.text_to_video(PROMPT, seed=7).frames)


def test_jacobi_agrees_with_the_sequential_inverse(video):
    sequential = video.text_to_video(PROMPT, jacobi=False, denoise=False, seed=3)
    jacobi = video.text_to_video(PROMPT, jacobi=True, jacobi_threshold=1e-6, jacobi_max_iter=64, denoise=False,
                                 seed=3)
    a, b = np.array(sequential.sampled), np.array(jacobi.sampled)
    assert np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) < 1e-2
    # the sequential inverse makes one pass per token of each block; Jacobi far fewer
    passes = lambda r: sum(b["passes"] for b in r.record["sampler"].values())  # noqa: E731
    assert passes(jacobi) < passes(sequential)


class ConstantDecode:
    def __init__(self, value):
        self.value = value

    def push(self, latent_frame):
        return mx.full((1, 1, 64, 64, 3), self.value)


def test_a_nan_or_constant_sample_names_the_stage(video, monkeypatch):
    monkeypatch.setattr(video.vae, "decode_stream", lambda **kw: ConstantDecode(mx.nan))
    assert "decode" in refusal(lambda: video.text_to_video(PROMPT, denoise=False))
    monkeypatch.setattr(video.vae, "decode_stream", lambda **kw: ConstantDecode(3.0))
    message = refusal(lambda: video.text_to_video(PROMPT, denoise=False))
    assert "decode" in message and "collapsed" in message and "float32" in message


# ----------------------------------------------------------------------------------------------------------------
# Given frames: image to video, continuation, long video
# ----------------------------------------------------------------------------------------------------------------


def test_image_to_video_keeps_the_given_frame(video):
    events = []
    result = video.image_to_video(PROMPT, picture(), progress=events.append, jacobi=False)
    assert result.frames.shape == (1, 9, 64, 64, 3)
    assert result.given.shape == (1, 1, 48, 4, 4)
    # the prefix is kept: the deep block keeps its tokens, the per-frame shallow blocks invert their own forward
    # (exactly, up to float32, with the sequential inverse)
    np.testing.assert_allclose(np.array(result.sampled[:, :1]), np.array(result.given), atol=1e-4)
    assert [s for kind, s in stages(events) if kind == "StageStarted"] == list(STAGES)
    assert result.record["given_frames"] == 1
    other = video.image_to_video(PROMPT, picture(seed=1))
    assert not np.array_equal(np.array(other.given), np.array(result.given))


def test_video_to_video_continues_from_the_last_frames(video):
    clip = np.stack([picture(seed=i) for i in range(9)])
    result = video.video_to_video(PROMPT, clip, frames=13, given_frames=5, jacobi=False)
    assert result.frames.shape == (1, 13, 64, 64, 3)
    assert result.given.shape == (1, 2, 48, 4, 4)  # 5 frames: 2 latent frames
    np.testing.assert_allclose(np.array(result.sampled[:, :2]), np.array(result.given), atol=1e-4)
    # the last 5 frames are given: the first 4 of the clip play no part
    changed = clip.copy()
    changed[:4] = 0
    again = video.video_to_video(PROMPT, changed, frames=13, given_frames=5, jacobi=False)
    assert np.array_equal(again.frames, result.frames)


def test_video_to_video_can_keep_the_first_frames_and_regenerate_the_rest(video):
    clip = np.stack([picture(seed=i) for i in range(9)])
    result = video.video_to_video(PROMPT, clip, frames=9, given_frames=5, given_from="start", jacobi=False)
    assert result.frames.shape == (1, 9, 64, 64, 3)
    # the first 5 frames are given: changing the clip after them changes nothing, changing them does
    changed = clip.copy()
    changed[5:] = 0
    again = video.video_to_video(PROMPT, changed, frames=9, given_frames=5, given_from="start", jacobi=False)
    assert np.array_equal(again.frames, result.frames)
    changed[:5] = 0
    other = video.video_to_video(PROMPT, changed, frames=9, given_frames=5, given_from="start", jacobi=False)
    assert not np.array_equal(other.given, result.given)
    assert refusal(lambda: video.video_to_video(PROMPT, clip, given_from="middle")) == (
        "given_from must be one of end, start, got 'middle'")


def test_long_video_slides_the_window_past_the_training_length(video):
    assert video.config.frames == 9
    result = video.text_to_video(PROMPT, frames=21, denoise=False, context_length=1)
    assert result.frames.shape == (1, 21, 64, 64, 3) and result.latent.shape[1] == 6
    deep = result.record["sampler"][str(len(video.flow.blocks) - 1)]
    assert deep["reencodes"] == 2  # a 3-frame window, 1 frame carried over: frames 0-2, 2-4, 4-5


# ----------------------------------------------------------------------------------------------------------------
# Likelihood
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["t2v", "t2i"])
def test_log_likelihood_is_the_flow_nll_of_the_noised_latent(task, video, image):
    pipeline = video if task == "t2v" else image
    source = np.stack([picture(seed=i) for i in range(9)]) if task == "t2v" else picture()
    captions = [PROMPT, "a dog", ""]
    scored = pipeline.log_likelihood(source, captions, seed=4)
    assert scored.bits_per_dim.shape == (3,) and np.all(np.isfinite(scored.bits_per_dim))
    again = pipeline.log_likelihood(source, captions, seed=4)
    assert np.array_equal(scored.bits_per_dim, again.bits_per_dim)
    assert not np.array_equal(np.array(pipeline.log_likelihood(source, captions, seed=5).latent),
                              np.array(scored.latent))
    text = pipeline._encode([pipeline.template(c, pipeline.settings()) for c in captions])
    rows = mx.broadcast_to(scored.latent, (3, *scored.latent.shape[1:]))
    by_hand = np.array(pipeline.flow.nll(rows, text)) / np.log(2)
    np.testing.assert_allclose(scored.bits_per_dim, by_hand, rtol=1e-5)
    assert scored.record["bits_per_dim"] == scored.bits_per_dim.tolist() and "noise" in scored.record["note"]


# ----------------------------------------------------------------------------------------------------------------
# Cancellation
# ----------------------------------------------------------------------------------------------------------------


def test_closing_the_stream_stops_between_chunks(video):
    stream = video.stream(PROMPT, "t2v")
    seen = []
    for event in stream:
        seen.append(event)
        if isinstance(event, ChunkSolved):
            break
    stream.close()
    assert next(stream, None) is None  # nothing more is computed or yielded
    assert not any(isinstance(e, (Sampled, Generated)) for e in seen)


def test_cancel_event_raises_cancelled_at_the_next_event(video):
    cancel, seen = threading.Event(), []

    def progress(event):
        seen.append(event)
        if isinstance(event, ChunkSolved):
            cancel.set()

    with pytest.raises(Cancelled):
        video.text_to_video(PROMPT, progress=progress, cancel=cancel)
    assert isinstance(seen[-1], ChunkSolved) and sum(isinstance(e, ChunkSolved) for e in seen) == 1
    calls = []
    with pytest.raises(Cancelled):
        video.text_to_video(PROMPT, cancel=lambda: calls.append(1) or len(calls) >= 3)
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------------------------
# Bad requests: one line naming the field, raised before any event
# ----------------------------------------------------------------------------------------------------------------

BAD_SETTINGS = {
    "frames-zero": ({"frames": 0}, "frames"),
    "frames-not-decodable": ({"frames": 10}, "frames 10"),
    "frames-huge": ({"frames": 10**9}, "frames"),
    "frames-text": ({"frames": "9"}, "frames"),
    "fps-negative": ({"fps": -1}, "fps"),
    "fps-zero-for-video": ({"fps": 0}, "fps 0"),
    "aspect-ratio-untrained": ({"aspect_ratio": "16:9"}, "aspect_ratio '16:9'"),
    "aspect-ratio-unknown": ({"aspect_ratio": "7:3"}, "aspect_ratio"),
    "guidance-negative": ({"guidance": -1.0}, "guidance"),
    "guidance-nan": ({"guidance": float("nan")}, "guidance"),
    "jacobi-not-bool": ({"jacobi": "yes"}, "jacobi"),
    "block-size-zero": ({"jacobi_block_size": 0}, "jacobi_block_size"),
    "threshold-over-1": ({"jacobi_threshold": 2.0}, "jacobi_threshold"),
    "max-iter-zero": ({"jacobi_max_iter": 0}, "jacobi_max_iter"),
    "step-size-zero": ({"denoise_step_size": 0.0}, "denoise_step_size"),
    "noise-std-zero": ({"target_noise_std": 0.0}, "target_noise_std"),
    "context-negative": ({"context_length": -1}, "context_length"),
    "attention-temperature": ({"attention_temperature": 0.5}, "attention_temperature"),
    "seed-negative": ({"seed": -1}, "seed"),
    "seed-float": ({"seed": 1.5}, "seed"),
    "samples-zero": ({"num_samples": 0}, "num_samples"),
    "samples-too-many": ({"num_samples": 65}, "num_samples"),
    "unknown-setting": ({"cfg": 3.0}, "unknown setting 'cfg'"),
    "task-unknown": ({"task": "x2v"}, "task"),
    "prompt-not-text": ({"prompt": 3}, "prompt"),
    "image-for-t2v": ({"image": picture()}, "takes no image"),
    "i2v-without-image": ({"task": "i2v"}, "needs an image"),
    "v2v-without-video": ({"task": "v2v"}, "needs a video"),
    "i2v-image-shape": ({"task": "i2v", "image": np.zeros((4, 4), np.uint8)}, "image must be (H, W, 3) pixels"),
    "i2v-image-not-pixels": ({"task": "i2v", "image": [[0, 0, 0]]}, "image must be a file path or a numpy array"),
    "i2v-image-nan": ({"task": "i2v", "image": np.full((8, 8, 3), np.nan, np.float32)}, "image holds NaN"),
    "v2v-video-shape": ({"task": "v2v", "video": np.zeros((9, 8, 8), np.uint8)}, "video must be (T, H, W, 3)"),
    "v2v-video-inf": ({"task": "v2v", "video": np.full((9, 8, 8, 3), np.inf, np.float32)}, "video holds NaN"),
    "v2v-video-not-pixels": ({"task": "v2v", "video": 3}, "video must be a file path or a numpy array"),
    "v2v-too-few-frames": (
        {"task": "v2v", "video": np.zeros((2, 8, 8, 3), np.uint8), "given_frames": 5}, "video has 2 frames"),
    "given-frames-not-decodable": (
        {"task": "v2v", "video": np.zeros((9, 8, 8, 3), np.uint8), "given_frames": 4}, "given_frames 4"),
    "given-from-for-i2v": ({"task": "i2v", "image": picture(), "given_from": "start"},
                           "given_from is an argument of video_to_video, not of task i2v"),
    "given-frames-all": (
        {"task": "v2v", "video": np.zeros((9, 8, 8, 3), np.uint8), "given_frames": 9}, "given_frames 9"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS), ids=list(BAD_SETTINGS))
def test_bad_request_is_one_line_naming_the_field(case, video):
    overrides, words = BAD_SETTINGS[case]
    overrides = dict(overrides)
    prompt, task = overrides.pop("prompt", PROMPT), overrides.pop("task", "t2v")
    message = refusal(lambda: video.stream(prompt, task, **overrides))  # raised before the first event
    assert words in message


BAD_IMAGE_SETTINGS = {
    "t2i-frames": ({"frames": 2}, "frames 2"),
    "t2i-learnable-denoiser": ({"learnable_denoiser": True}, "no learnable denoiser"),
    "t2i-i2v": ({"task": "i2v", "image": picture()}, "needs a video pipeline"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_SETTINGS), ids=list(BAD_IMAGE_SETTINGS))
def test_bad_image_request_is_one_line_naming_the_field(case, image):
    overrides, words = BAD_IMAGE_SETTINGS[case]
    overrides = dict(overrides)
    task = overrides.pop("task", "t2i")
    assert words in refusal(lambda: image.stream(PROMPT, task, **overrides))


def test_likelihood_refuses_bad_captions(video):
    assert "texts" in refusal(lambda: video.log_likelihood(picture(), []))
    assert "texts[1]" in refusal(lambda: video.log_likelihood(picture(), ["ok", 5]))


def test_settings_defaults_are_the_folder_config(video):
    settings = video.settings()
    assert isinstance(settings, Settings)
    for name in ("frames", "fps", "aspect_ratio", "guidance", "jacobi_block_size", "context_length"):
        assert getattr(settings, name) == getattr(video.config, name)


def test_image_to_video_from_a_file_equals_from_its_pixels(video, tmp_path):
    from PIL import Image

    path = tmp_path / "first.png"
    Image.fromarray(picture()).save(path)
    from_file = video.image_to_video(PROMPT, path, denoise=False)
    from_pixels = video.image_to_video(PROMPT, picture(), denoise=False)
    assert np.array_equal(from_file.frames, from_pixels.frames)
    missing = tmp_path / "missing.png"
    assert str(missing) in refusal(lambda: video.stream(PROMPT, "i2v", image=missing))


# ----------------------------------------------------------------------------------------------------------------
# Prompts longer than the flow's text window
# ----------------------------------------------------------------------------------------------------------------

LONG_CAPTION = "a red car drives along a coastal road at sunset " * 6


def test_an_over_long_prompt_is_refused_not_cut(video, image):
    window = video.flow.config.txt_size
    for call in (lambda: video.text_to_video(LONG_CAPTION), lambda: image.text_to_image(LONG_CAPTION),
                 lambda: video.stream(LONG_CAPTION, "t2v")):
        message = refusal(call)
        assert message.startswith("prompt is too long: ") and f"the model reads {window}" in message, message
    scored = refusal(lambda: video.log_likelihood(np.stack([picture(seed=i) for i in range(9)]), [PROMPT, LONG_CAPTION]))
    assert scored.startswith("captions[1] is too long: "), scored
    # the longest caption that fits still runs: the limit is the window, not a guess
    fitting = PROMPT
    while len(video.tokenizer.encode(video.template(fitting + " x", video.settings()))) + 1 <= window:
        fitting += " x"
    assert video.text_to_video(fitting, frames=5, seed=1).frames.shape[1] == 5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_at_load_quantizes_flow_and_t5_and_is_recorded(bits, video, folders):
    import mlx.nn as nn

    quantized = Pipeline.from_pretrained(folders["t2v"], q_bits=bits, q_group_size=32)
    modules = dict(quantized.flow.named_modules())
    for path, linear in video.flow.named_modules():
        if isinstance(linear, nn.Linear):  # the converter's rule: widths of whole groups, never proj_in/proj_out
            expected = linear.weight.shape[-1] % 32 == 0 and not any(s in path for s in ("proj_in", "proj_out"))
            assert isinstance(modules[path], nn.QuantizedLinear) == expected, path
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.flow.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.text_encoder.named_modules())
    result = quantized.text_to_video("a red square moving right", seed=0, frames=5)
    assert result.record["model"]["quantized_at_load"] == {"bits": bits, "group_size": 32}
    reference = video.text_to_video("a red square moving right", seed=0, frames=5)
    assert "quantized_at_load" not in reference.record["model"]
    bits_q, bits_f = result.record["bits_per_dim"][0], reference.record["bits_per_dim"][0]
    assert np.isfinite(bits_q) and bits_q != bits_f


@pytest.mark.parametrize("q_bits, q_group_size, words", [
    (3, 64, "q_bits must be one of 4, 8, got 3"), (True, 64, "q_bits must be one of"),
    ("8", 64, "q_bits must be one of"), (8.0, 64, "q_bits must be one of 4, 8, got 8.0"),
    (8, 48, "q_group_size must be one of 32, 64, 128, got 48"),
    (8, None, "q_group_size must be one of"),
], ids=["3-bits", "bool", "string", "float", "group-48", "group-none"])
def test_bad_load_quantization_is_one_line(q_bits, q_group_size, words, folders):
    with pytest.raises(ValueError, match=words) as error:
        Pipeline.from_pretrained(folders["t2v"], q_bits=q_bits, q_group_size=q_group_size)
    assert "\n" not in str(error.value)
