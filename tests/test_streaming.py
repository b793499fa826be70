"""Frames streamed out while generating (issue 11): the exact incremental denoiser (``sampler.FrameDenoiser``) and
its receptive-field horizon, ``Pipeline.stream``'s ``FramesDecoded`` (equal within 1e-5 to the non-streamed path,
in order, before the clip is sampled), and the CLI's mp4 written while sampling (equal to the one written at the
end; nothing left behind by Ctrl-C)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402

from starflow_mlx import cli, media, pipeline as pipeline_module  # noqa: E402
from starflow_mlx.config import DENOISER_LAYERS, FlowConfig  # noqa: E402
from starflow_mlx.denoiser import window_mask  # noqa: E402
from starflow_mlx.flow import StarFlow  # noqa: E402
from starflow_mlx.pipeline import FramesDecoded, Generated, Pipeline, StageFinished  # noqa: E402
from starflow_mlx.sampler import (  # noqa: E402
    ChunkSolved, FrameDenoiser, FrameSampled, FramesDenoised, Sampled, denoise, denoiser_horizon, stream_denoise,
)
from tests.helpers import maxerr  # noqa: E402

PROMPT = "a red square moving right"
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The denoiser's receptive field
# ----------------------------------------------------------------------------------------------------------------


def reach_of_the_mask(block_causal: int, layers: int, window: int | None, txt_len=3, frame_size=2) -> int:
    """How many frames after its own an output frame depends on, found by following the mask through ``layers``
    layers (attention over the mask's keys, the residual and the MLP keep the token itself)."""
    frames = layers * max(block_causal - 1, 0) + 4
    mask = window_mask(txt_len, frames, frame_size, block_causal, window) | np.eye(txt_len + frames * frame_size,
                                                                              dtype=bool)
    depends = np.eye(len(mask), dtype=bool)
    for _ in range(layers):
        depends = (mask.astype(np.int64) @ depends.astype(np.int64)) > 0
    frame = lambda token: (token - txt_len) // frame_size  # noqa: E731
    return max(frame(np.flatnonzero(depends[q])[-1]) - frame(q) for q in range(txt_len, txt_len + frame_size))


@pytest.mark.parametrize("block_causal, layers, window", [
    (1, DENOISER_LAYERS, None), (2, DENOISER_LAYERS, None), (2, DENOISER_LAYERS, 4), (3, DENOISER_LAYERS, 10),
    (2, 1, None), (3, 2, None),
], ids=["causal-8", "A2-8", "A2-8-window4", "A3-8-window10", "A2-1", "A3-2"])
def test_the_horizon_is_how_far_the_mask_reaches(block_causal, layers, window):
    assert denoiser_horizon(block_causal, layers) == reach_of_the_mask(block_causal, layers, window)


def test_no_mask_means_the_whole_chunk():
    assert denoiser_horizon(0) is None


C, S, L, D = 3, 4, 3, 8
TINY = dict(in_channels=C, img_size=S, channels=32, layers_per_block=[1, 1], txt_size=L, txt_dim=D, head_dim=32,
            patch_size=2, seq_order="L2R", shallow_block_local=True, learnable_self_denoiser=True,
            conditional_denoiser=True, vid_size="9:16", denoiser_window=4)


def random_flow(block_causal: int, layers: int = DENOISER_LAYERS) -> StarFlow:
    mx.random.seed(0)
    flow = StarFlow(FlowConfig(**TINY, temporal_causal=block_causal))
    flow.denoiser.layers = flow.denoiser.layers[:layers]
    return flow


def clip(frames=30, batch=2):
    return (mx.random.normal((batch, frames, C, S, S), key=mx.random.key(1)),
            mx.random.normal((batch, L, D), key=mx.random.key(2)))


def one_by_one(denoiser: FrameDenoiser, x: mx.array) -> list[tuple[int, FramesDenoised]]:
    """(frames pushed, event) for each event, pushing the frames one at a time."""
    return [(t + 1, e) for t in range(x.shape[1]) for e in denoiser.push(x[:, t : t + 1])]


@pytest.mark.parametrize("block_causal, window", [(2, None), (2, 20), (3, 12)], ids=["A2", "A2-window20", "A3-window12"])
def test_frames_denoised_one_by_one_equal_the_whole_latent_denoised(block_causal, window):
    flow = random_flow(block_causal)
    x, text = clip()
    horizon = denoiser_horizon(block_causal)
    denoiser = FrameDenoiser(flow, text, x.shape[1], window)
    events = one_by_one(denoiser, x)
    assert maxerr(denoiser.finish().latent, denoise(flow, x, text, window)) <= TOLERANCE
    assert [(e.start, e.stop) for _, e in events] == list(zip([0] + [e.stop for _, e in events[:-1]],
                                                            [e.stop for _, e in events]))
    assert events[-1][1].stop == x.shape[1]
    # as soon as final: its horizon is in, or its whole chunk
    assert events[0][0] == min(horizon + 1, window or x.shape[1]) and events[0][1].start == 0
    assert all(e.latent.shape == (2, e.stop - e.start, C, S, S) for _, e in events)
    # the extra work: a partial pass at least doubles the chunk's final frames
    steps = window or x.shape[1]
    chunks = 1 + max(0, -(-(x.shape[1] - steps) // (steps - flow.config.denoiser_window)))
    assert len(events) <= chunks * (1 + int(np.log2(steps)) + 1)


def test_frames_pushed_at_once_take_one_pass_per_chunk_as_stream_denoise():
    flow = random_flow(2)
    x, text = clip()
    denoiser = FrameDenoiser(flow, text, x.shape[1], 12)
    pushed = [(e.start, e.stop) for e in denoiser.push(x)]
    official = [(e.start, e.stop) for e in stream_denoise(flow, x, text, 12) if isinstance(e, FramesDenoised)]
    assert pushed == official == [(0, 12), (12, 20), (20, 28), (28, 30)]


@pytest.mark.parametrize("layers", [1, 2], ids=["1-layer", "2-layers"])
def test_one_frame_less_than_the_horizon_changes_the_frames(layers):
    flow = random_flow(2, layers)  # a cut denoiser: 8 layers' farthest path is below float32 noise at random init
    x, text = clip(frames=12)
    expected = denoise(flow, x, text)
    horizon = denoiser_horizon(2, layers)
    errors = []
    for h in (horizon, horizon - 1):
        denoiser = FrameDenoiser(flow, text, x.shape[1], horizon=h)
        one_by_one(denoiser, x)
        errors.append(maxerr(denoiser.finish().latent, expected))
    assert errors[0] <= TOLERANCE < 1e-3 < errors[1], errors


def test_pushing_past_the_clip_is_refused():
    flow = random_flow(2)
    x, text = clip(frames=3)
    denoiser = FrameDenoiser(flow, text, 2)
    with pytest.raises(ValueError, match="pushed 3 latent frames, more than the 2 of the clip"):
        denoiser.push(x)
    with pytest.raises(ValueError, match="0 of 2 latent frames are denoised: push the rest first"):
        denoiser.finish()


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes() -> Pipeline:
    return Pipeline.from_pretrained(dtype="float32")


def generate(pipeline: Pipeline, task="t2v", **settings):
    """(result, events) of one generation."""
    events = list(pipeline.stream(PROMPT, task, **settings))
    assert isinstance(events[-1], Generated)
    return events[-1].result, events


def streamed_frames(events) -> np.ndarray:
    pieces = [e for e in events if isinstance(e, FramesDecoded)]
    assert [(p.start, p.stop) for p in pieces] == list(zip([0] + [p.stop for p in pieces[:-1]],
                                                          [p.stop for p in pieces]))  # in order, each frame once
    assert pieces[-1].stop == pieces[-1].total
    return np.concatenate([p.frames for p in pieces], axis=1)


def text_of(pipeline: Pipeline, result) -> mx.array:
    return pipeline._encode([result.record["prompt_templated"]] * result.record["settings"]["num_samples"])


def decoded(pipeline: Pipeline, latent: mx.array) -> np.ndarray:
    """The VAE's whole-clip decode, sample by sample, clipped as ``Generation.frames``."""
    pixels = [np.array(pipeline.vae.from_flow_latent(latent[i : i + 1]).transpose(0, 1, 3, 4, 2))
              for i in range(latent.shape[0])]
    return np.clip(np.concatenate(pixels), -1, 1)


def before_the_first_frame_out(pipeline: Pipeline, events) -> tuple[int, int, int]:
    """(deep-block chunks solved before the first FramesDecoded, all of them, latent frames sampled before it)."""
    deep = len(pipeline.flow.blocks) - 1
    first = next(i for i, e in enumerate(events) if isinstance(e, FramesDecoded))
    chunks = [isinstance(e, ChunkSolved) and e.block == deep for e in events]
    return sum(chunks[:first]), sum(chunks), sum(isinstance(e, FrameSampled) for e in events[:first])


def test_the_shipped_model_streams_the_frames_of_the_non_streamed_path(shapes):
    result, events = generate(shapes, jacobi=False, seed=1)
    frames = streamed_frames(events)
    assert np.array_equal(frames, result.frames)
    assert maxerr(frames, decoded(shapes, denoise(shapes.flow, result.sampled, text_of(shapes, result)))) <= TOLERANCE
    official, official_events = generate(shapes, jacobi=False, seed=1, stream_frames=False)
    assert maxerr(frames, official.frames) <= TOLERANCE
    kinds = [type(e).__name__ for e in official_events]  # not streamed: every frame after the sample
    assert kinds.index("Sampled") < kinds.index("FramesDenoised") < kinds.index("FramesDecoded")
    # 5 latent frames, a denoiser horizon of 8: the denoiser waits for the whole clip, the decoder does not
    assert [type(e).__name__ for e in events].index("FramesDecoded") < [type(e).__name__ for e in events].index(
        "Sampled")


def test_without_the_denoiser_the_first_frame_leaves_after_the_first_latent_frame(shapes):
    result, events = generate(shapes, seed=1, denoise=False, frames=9)
    deep_before, deep_chunks, sampled_before = before_the_first_frame_out(shapes, events)
    assert sampled_before == 1 and deep_before < deep_chunks
    assert np.array_equal(streamed_frames(events), result.frames)
    assert maxerr(result.frames, decoded(shapes, result.sampled)) <= TOLERANCE


@pytest.fixture(scope="module")
def random_long(shapes):
    """A random-weight flow of the shipped config whose denoiser shares 4 frames between chunks, with the shipped
    T5 and VAE: a 49-frame clip (13 latent frames, 2.6x the training clip) with a 10-frame sliding window, which is
    also the denoiser's chunk (frames 0-9, then 6-15 writing 10-12). (pipeline, result, events)."""
    mx.random.seed(3)
    flow = StarFlow(dataclasses.replace(shapes.flow.config, denoiser_window=4))
    pipeline = Pipeline.from_pretrained(shapes.folder.root, "float32")
    pipeline._parts["flow"], pipeline.flow_config = flow, flow.config  # random weights, denoiser_window 4
    result, events = generate(pipeline, frames=49, window=10, context_length=4, seed=2)
    return pipeline, result, events


def test_a_long_clip_with_a_sliding_window_streams_the_non_streamed_path(random_long):
    pipeline, result, events = random_long
    assert result.latent.shape[1] == 13 and result.record["sampler"]["3"]["reencodes"] == 1
    assert maxerr(result.latent, denoise(pipeline.flow, result.sampled, text_of(pipeline, result), 10)) <= TOLERANCE
    frames = streamed_frames(events)
    assert frames.shape == result.frames.shape == (1, 49, 64, 64, 3) and np.array_equal(frames, result.frames)
    # the decoder is causal: the first 4 latent frames decode to the first 13 frames of the clip
    assert maxerr(frames[:, :13], decoded(pipeline, result.latent[:, :4])) <= TOLERANCE
    # frame 0 once frames 0-8 are sampled (its horizon), 1-9 with frame 9 (the chunk is complete), then 10-12
    assert [(e.start, e.stop) for e in events if isinstance(e, FramesDenoised)] == [(0, 1), (1, 10), (10, 13)]


def test_the_first_frames_arrive_while_the_deep_block_is_solving(random_long):
    pipeline, _, events = random_long
    deep_before, deep_chunks, sampled_before = before_the_first_frame_out(pipeline, events)
    # the first latent frame is final once its denoiser horizon (8 frames) is sampled: 9 of 13 frames
    assert sampled_before == denoiser_horizon(2) + 1 == 9
    assert 0 < deep_before < deep_chunks
    assert [e.stage for e in events if isinstance(e, StageFinished)] == ["text", "sample", "denoise", "decode"]


def test_on_frame_gets_every_piece_and_tiles_reach_the_decoder(shapes, monkeypatch):
    tile_sizes, pieces = [], []
    decode_stream = shapes.vae.decode_stream
    monkeypatch.setattr(shapes.vae, "decode_stream",
                        lambda **kw: tile_sizes.append(kw["tile_size"]) or decode_stream(**kw))
    result = shapes.text_to_video(PROMPT, on_frame=pieces.append, frames=5, decode_tile_size=3, num_samples=2)
    assert tile_sizes == [3, 3]  # one decode stream per sample
    assert np.array_equal(np.concatenate([p.frames for p in pieces], axis=1), result.frames)
    assert result.record["settings"]["decode_tile_size"] == 3 and result.record["settings"]["stream_frames"]


def test_an_image_is_one_piece(folders):
    image = Pipeline.from_pretrained(folders["t2i"])
    pieces = []
    result = image.text_to_image(PROMPT, on_frame=pieces.append)
    assert [(p.start, p.stop, p.total) for p in pieces] == [(0, 1, 1)]
    assert np.array_equal(pieces[0].frames, result.frames)


def test_the_gradient_step_waits_for_the_whole_clip(shapes):
    result, events = generate(shapes, learnable_denoiser=False, frames=5)
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("Denoised") < kinds.index("FramesDecoded")
    assert np.array_equal(streamed_frames(events), result.frames)


@pytest.mark.parametrize("setting, value, words", [
    ("window", 0, "Settings.window"), ("window", 2.5, "Settings.window"),
    ("stream_frames", "yes", "Settings.stream_frames"), ("decode_tile_size", 0, "Settings.decode_tile_size"),
], ids=["window-zero", "window-float", "stream-frames-not-bool", "tile-size-zero"])
def test_bad_streaming_settings_are_one_line(shapes, setting, value, words):
    with pytest.raises(ValueError, match=words) as error:
        shapes.stream(PROMPT, "t2v", **{setting: value})
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# The CLI writes the mp4 while sampling
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def watched(monkeypatch):
    """Records, for each frame the VideoWriter receives, whether the sampler had finished; and each result."""
    log = {"sampled": False, "writes": [], "frames": [], "results": []}
    stream_sample, write, sample = pipeline_module.stream_sample, media.VideoWriter.write, cli._sample

    def watched_sampler(*args, **kwargs):
        log["sampled"] = False
        for event in stream_sample(*args, **kwargs):
            log["sampled"] = log["sampled"] or isinstance(event, Sampled)
            yield event

    def watched_write(self, frame):
        log["writes"].append(log["sampled"])
        log["frames"].append(np.array(frame))
        write(self, frame)

    def watched_sample(*args, **kwargs):
        log["results"].append(sample(*args, **kwargs))
        return log["results"][-1]

    monkeypatch.setattr(pipeline_module, "stream_sample", watched_sampler)
    monkeypatch.setattr(media.VideoWriter, "write", watched_write)
    monkeypatch.setattr(cli, "_sample", watched_sample)
    return log


def run_generate(out, *extra) -> int:
    """The shipped model, 9 frames (3 latent), no denoiser (it would hold every frame to the end of this clip)."""
    return cli.main(["generate", PROMPT, "--out", str(out), "--frames", "9", "--no-denoise", *map(str, extra)])


def test_the_mp4_is_written_while_sampling_and_equals_the_one_written_at_the_end(tmp_path, watched):
    out = tmp_path / "clip.mp4"
    assert run_generate(out, "--seed", 3) == 0
    assert len(watched["writes"]) == 9 and not watched["writes"][0]  # the first frames before the clip was done
    result = watched["results"][0]
    assert np.array_equal(np.stack(watched["frames"]), result.frames[0])  # what the writer got: the clip
    at_end = media.write_video(tmp_path / "at-end.mp4", result.frames[0], result.record["settings"]["fps"],
                               result.record)
    assert media.read_metadata(out) == media.read_metadata(at_end) == result.record
    assert media.probe_media(out) == media.probe_media(at_end)
    # two libx264 encodes of the same frames are not always the same bytes (seen under a loaded CPU: its threads'
    # rate decisions), so the decoded files are compared within the encoder's noise (a uint8 step is 2/255 here)
    ours, theirs = (media.read_video(path, (64, 64), 9).frames for path in (out, at_end))
    assert np.abs(ours - theirs).mean() <= 2 / 255 and np.abs(ours - theirs).max() <= 32 / 255


def test_best_of_n_writes_after_every_candidate(tmp_path, watched):
    assert run_generate(tmp_path / "best.mp4", "--best-of", 2, "--frames", 5) == 0
    assert len(watched["results"]) == 2 and watched["writes"] and all(watched["writes"])


def test_ctrl_c_while_streaming_leaves_no_file(tmp_path, watched, monkeypatch):
    write = media.VideoWriter.write

    def interrupted(self, frame):
        write(self, frame)
        if len(watched["writes"]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(media.VideoWriter, "write", interrupted)
    assert run_generate(tmp_path / "clip.mp4") == 130
    assert watched["writes"] == [False, False]  # interrupted while sampling
    assert list(tmp_path.iterdir()) == []
