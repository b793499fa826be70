"""Low memory and long runs: weights loaded per stage and released after it (``Pipeline(low_memory=True)``), MLX's
buffer cache bounded while a generation runs (``cache_limit``), the chunked pass over known tokens (scoring, the
prefill: ``StarFlow.__call__(chunk=)``), and memory that stays flat on a clip 3x the training length.

Memory is MLX's own count (``mx.get_active_memory`` / ``mx.get_peak_memory``), measured above what was in use
before the pipeline was made, so other tests' arrays do not count."""

from __future__ import annotations

import gc
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from starflow_mlx import hub, weights
from starflow_mlx.checkpoint import CheckpointError
from starflow_mlx.config import FlowConfig
from starflow_mlx.flow import StarFlow
from starflow_mlx.pipeline import PARTS, Pipeline, StageFinished, StageStarted
from starflow_mlx.sampler import ChunkSolved, Sampled
from tests.helpers import maxerr, refusal

PROMPT = "a red square moving right"
TRAINED_FRAMES = 17  # the shipped model's training length (pixel frames)
LONG_FRAMES = 49  # 3x as long: 13 latent frames against 5
LONGER_FRAMES = 65  # 4x as long: 17 latent frames
# A clip 3x as long may cost this fraction of the 1x peak more (its latents, frames and the scoring pass's KV cache,
# each a few percent here): a stage whose memory grew with the clip, e.g. a deep-block cache or a whole-sequence
# attention over all 13 latent frames, costs more than this on the shipped model.
FLAT = 0.08
EXACT = 1e-5  # chunked vs whole-sequence pass, float32


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


class StageMemory:
    """A progress callback that records, per stage, the bytes resident when it starts, its peak, and which parts
    were loaded at its start; and the sampling's own peak (up to the sampler's ``Sampled``) apart from the
    scoring of the sample that ends the stage."""

    def __init__(self, pipeline: Pipeline, base: int):
        self.pipeline, self.base = pipeline, base
        self.resident, self.peak, self.parts = {}, {}, {}

    def __call__(self, event) -> None:
        if isinstance(event, StageStarted):
            mx.clear_cache()  # buffers cached by the previous stage are not this one's
            self.resident[event.stage] = mx.get_active_memory() - self.base
            self.parts[event.stage] = self.pipeline.loaded_parts
            mx.reset_peak_memory()
        elif isinstance(event, Sampled):
            self.peak["sampling"] = mx.get_peak_memory() - self.base
        elif isinstance(event, StageFinished):
            self.peak[event.stage] = mx.get_peak_memory() - self.base


def measured(task: str = "t2v", low_memory: bool = False, **settings):
    """A fresh shipped pipeline's generation with its ``StageMemory`` and the pipeline."""
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    pipeline = Pipeline.from_pretrained(low_memory=low_memory)
    memory = StageMemory(pipeline, base)
    if task == "i2v":
        result = pipeline.image_to_video(PROMPT, np.full((64, 64, 3), 200, np.uint8), progress=memory, **settings)
    else:
        result = pipeline.text_to_video(PROMPT, progress=memory, **settings)
    return result, memory, pipeline


def part_bytes(pipeline: Pipeline, part: str) -> int:
    model = {"text": pipeline.text_encoder, "flow": pipeline.flow, "vae": pipeline.vae}[part]
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def eager():
    return measured(stream_frames=False)  # each stage's work in its own stage (streaming decodes while sampling)


@pytest.fixture(scope="module")
def low():
    return measured(low_memory=True, stream_frames=False)


def without_timings(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "timings"}


# ----------------------------------------------------------------------------------------------------------------
# Weights per stage
# ----------------------------------------------------------------------------------------------------------------


def test_low_memory_generates_exactly_the_eager_frames(eager, low):
    (ours, _, _), (theirs, _, _) = low, eager
    assert np.array_equal(ours.frames, theirs.frames)
    assert np.array_equal(np.array(ours.latent), np.array(theirs.latent))
    assert without_timings(ours.record) == without_timings(theirs.record)


def test_low_memory_holds_fewer_bytes_at_every_stage(eager, low):
    (_, eager_memory, eager_pipeline), (_, low_memory, pipeline) = eager, low
    sizes = {part: part_bytes(eager_pipeline, part) for part in PARTS}
    stages = ("text", "sample", "denoise", "decode")
    assert tuple(eager_memory.resident) == tuple(low_memory.resident) == stages
    for stage in stages:
        assert low_memory.resident[stage] < eager_memory.resident[stage], stage
        assert low_memory.peak[stage] < eager_memory.peak[stage], stage
    # what each stage starts with: nothing before T5 is needed, T5 gone before sampling, the flow before decoding
    assert low_memory.parts == {"text": (), "sample": (), "denoise": ("flow",), "decode": ()}
    assert low_memory.resident["text"] < 1024
    assert low_memory.resident["sample"] < sizes["text"] / 4
    assert low_memory.resident["decode"] < sizes["flow"] / 4
    assert eager_memory.resident["text"] >= sum(sizes.values())
    # a stage's peak holds its own part, not the others
    assert low_memory.peak["text"] < sizes["text"] + sizes["flow"]
    assert low_memory.peak["sample"] < eager_memory.peak["sample"] - sizes["text"] - sizes["vae"] / 2
    assert low_memory.peak["decode"] < eager_memory.peak["decode"] - sizes["flow"] / 2
    assert pipeline.loaded_parts == ()


def test_streaming_with_low_memory_loads_the_vae_while_sampling_and_gives_the_same_frames(low):
    ours, memory, pipeline = measured(low_memory=True)  # frames decoded as they are final, inside the sample stage
    assert np.array_equal(ours.frames, low[0].frames)
    assert memory.parts == {"text": (), "sample": (), "denoise": ("flow", "vae"), "decode": ("vae",)}
    assert pipeline.loaded_parts == ()


def test_image_to_video_releases_the_vae_while_sampling_and_reloads_it():
    ours, memory, pipeline = measured("i2v", low_memory=True, stream_frames=False)
    theirs = Pipeline.from_pretrained().image_to_video(PROMPT, np.full((64, 64, 3), 200, np.uint8))
    assert np.array_equal(ours.frames, theirs.frames)
    assert memory.parts == {"text": (), "prefix": (), "sample": ("flow",), "denoise": ("flow",), "decode": ()}
    assert pipeline.loaded_parts == ()


@pytest.mark.parametrize("q_bits", [None, 8], ids=["stored", "q8"])
def test_a_part_loaded_late_has_the_eager_dtype_and_quantization(q_bits):
    settings = dict(dtype="float32", q_bits=q_bits, q_group_size=32)
    eager_pipeline = Pipeline.from_pretrained(**settings)
    pipeline = Pipeline.from_pretrained(low_memory=True, **settings)
    assert pipeline.loaded_parts == ()
    ours, theirs = (p.text_to_image(PROMPT, seed=3) for p in (pipeline, eager_pipeline))
    assert np.array_equal(ours.frames, theirs.frames)
    assert ours.record["model"] == theirs.record["model"]
    again = pipeline.text_to_image(PROMPT, seed=3)  # every part dropped and read again
    assert np.array_equal(again.frames, ours.frames)


def test_low_memory_may_be_switched_between_generations():
    pipeline = Pipeline.from_pretrained()
    reference = pipeline.text_to_image(PROMPT, seed=1)
    assert pipeline.loaded_parts == PARTS
    pipeline.low_memory = True
    assert pipeline.loaded_parts == ()  # dropped at once
    assert np.array_equal(pipeline.text_to_image(PROMPT, seed=1).frames, reference.frames)
    assert pipeline.loaded_parts == ()
    pipeline.low_memory = False
    assert np.array_equal(pipeline.text_to_image(PROMPT, seed=1).frames, reference.frames)
    assert pipeline.loaded_parts == PARTS  # loaded when used, and kept


def test_likelihood_in_low_memory_equals_eager_and_releases_every_part():
    clip = np.random.default_rng(0).integers(0, 255, (17, 64, 64, 3), dtype=np.uint8)
    pipeline = Pipeline.from_pretrained(low_memory=True)
    ours = pipeline.log_likelihood(clip, [PROMPT, "a blue circle moving up"])
    theirs = Pipeline.from_pretrained().log_likelihood(clip, [PROMPT, "a blue circle moving up"])
    assert np.array_equal(ours.bits_per_dim, theirs.bits_per_dim)
    assert pipeline.loaded_parts == ()


def test_sizes_settings_and_records_read_no_weight(monkeypatch):
    pipeline = Pipeline.from_pretrained(low_memory=True)
    monkeypatch.setattr(weights, "read_model_folder", lambda folder: pytest.fail(f"weights of {folder} read"))
    settings = pipeline.settings(frames=LONG_FRAMES)
    assert pipeline.pixel_size(settings) == (64, 64)
    assert pipeline.latent_frames(settings.frames) == 13
    assert pipeline.noise_std(settings) == pytest.approx(0.3)
    pipeline.check_prompt_length(pipeline.template(PROMPT, settings))
    assert pipeline.model_record()["parts"]["flow"]["model_type"] == "flow"
    assert "1 + 4k" in refusal(lambda: pipeline.settings(frames=18))
    stream = pipeline.stream(PROMPT, frames=LONG_FRAMES)  # checked, not started
    stream.close()
    assert pipeline.loaded_parts == ()


def _broken(tmp_path, part: str, key: str, value) -> str:
    root = tmp_path / "model"
    shutil.copytree(hub.default_model(), root)
    path = root / part / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    return str(root)


@pytest.mark.parametrize(
    "part, key, value, words",
    [
        ("vae", "num_res_blocks", 0, "num_res_blocks"),
        ("vae", "latents_std", [0.0] * 16, "latents_std"),
        ("text", "num_heads", "four", "num_heads"),
        ("text", "layer_norm_epsilon", 5.0, "layer_norm_epsilon"),
        ("flow", "head_dim", 0, "head_dim"),
    ],
    ids=["vae-blocks", "vae-std", "t5-heads", "t5-epsilon", "flow-head-dim"],
)
def test_a_broken_part_config_is_refused_at_load_without_reading_weights(tmp_path, monkeypatch, part, key, value,
                                                                       words):
    folder = _broken(tmp_path, part, key, value)
    read = []
    monkeypatch.setattr(weights, "read_model_folder", lambda f: read.append(f) or pytest.fail("weights read"))
    message = refusal(lambda: Pipeline.from_pretrained(folder, low_memory=True), CheckpointError)
    assert f"{part}/config.json" in message and words in message
    assert read == []


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("low_memory", "yes", "low_memory must be True or False"),
        ("low_memory", 1, "low_memory must be True or False"),
        ("low_memory", None, "low_memory must be True or False"),
        ("cache_limit", -1, "cache_limit (bytes) must be >= 0"),
        ("cache_limit", 1.5, "cache_limit (bytes) must be an integer"),
        ("cache_limit", True, "cache_limit (bytes) must be an integer"),
        ("cache_limit", "1GB", "cache_limit (bytes) must be an integer"),
        ("cache_limit", 2**64, "cache_limit (bytes) must be <="),
    ],
    ids=["low-str", "low-int", "low-none", "limit-negative", "limit-float", "limit-bool", "limit-str", "limit-huge"],
)
def test_bad_memory_settings_are_one_line_at_load_and_on_change(name, value, words, eager):
    assert words in refusal(lambda: Pipeline.from_pretrained(**{name: value}))
    pipeline = eager[2]
    before = getattr(pipeline, name)
    assert words in refusal(lambda: setattr(pipeline, name, value))
    assert getattr(pipeline, name) == before


# ----------------------------------------------------------------------------------------------------------------
# The cache limit
# ----------------------------------------------------------------------------------------------------------------


def cache_limit_now() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


@pytest.fixture
def known_cache_limit():
    previous = mx.set_cache_limit(7 << 20)
    yield 7 << 20
    mx.set_cache_limit(previous)


@pytest.mark.parametrize("ending", ["finished", "closed", "failed"])
def test_the_cache_limit_holds_while_generating_and_is_restored(known_cache_limit, eager, ending):
    pipeline = eager[2]
    pipeline.cache_limit = 12345
    seen = []
    try:
        stream = pipeline.stream(PROMPT, "t2i")
        for event in stream:
            seen.append(cache_limit_now())
            if ending != "finished" and isinstance(event, ChunkSolved):
                if ending == "failed":
                    raise KeyError("the consumer failed")
                break
        stream.close()
    except KeyError:
        stream.close()
    finally:
        pipeline.cache_limit = None
    assert seen and set(seen) == {12345}
    assert cache_limit_now() == known_cache_limit


def test_cache_limit_none_leaves_mlx_alone_and_applies_to_likelihoods(known_cache_limit, eager):
    pipeline = eager[2]
    seen = []
    pipeline.text_to_image(PROMPT, progress=lambda event: seen.append(cache_limit_now()))
    assert set(seen) == {known_cache_limit}
    pipeline.cache_limit = 4096
    calls = []
    original = pipeline._encode
    pipeline._encode = lambda texts: calls.append(cache_limit_now()) or original(texts)
    try:
        pipeline.log_likelihood(np.zeros((64, 64, 3), np.uint8), PROMPT, frames=1)
    finally:
        del pipeline._encode
        pipeline.cache_limit = None
    assert calls == [4096] and cache_limit_now() == known_cache_limit


# ----------------------------------------------------------------------------------------------------------------
# The chunked pass over known tokens
# ----------------------------------------------------------------------------------------------------------------

C, TXT, WIDTH = 3, 3, 8


def random_flow(img_size: int = 4, layers=(1, 2), **extra) -> StarFlow:
    mx.random.seed(0)
    fields = dict(in_channels=C, img_size=img_size, channels=32, layers_per_block=list(layers), txt_size=TXT,
                  txt_dim=WIDTH, head_dim=16, patch_size=1, seq_order="L2R")
    return StarFlow(FlowConfig(**{**fields, **extra}))


VIDEO = dict(temporal_causal=2, shallow_block_local=True, vid_size="9:16")


@pytest.mark.parametrize("chunk", [1, 7, None], ids=["token", "odd", "frame"])
@pytest.mark.parametrize("kind", ["image", "video", "image-guided", "video-guided"])
def test_the_chunked_pass_equals_the_whole_sequence(kind, chunk):
    video = kind.startswith("video")
    flow = random_flow(**(VIDEO if video else {}))
    x = mx.random.normal((2, 3, C, 4, 4) if video else (2, C, 4, 4), key=mx.random.key(1))
    text = mx.random.normal((2, TXT, WIDTH), key=mx.random.key(2))
    guidance = 2.0 if kind.endswith("guided") else 0.0
    whole, chunked = flow.forward(x, text, guidance), flow(x, text, guidance, chunk=chunk)
    assert maxerr(chunked.z, whole.z) <= EXACT
    for ours, theirs in zip(chunked.logdets, whole.logdets):
        assert maxerr(ours, theirs) <= EXACT
    assert maxerr(chunked.nll(), whole.nll()) <= EXACT
    assert maxerr(whole.z, x) > 0.1  # the blocks do something


def test_the_chunked_prefill_equals_the_whole_one(monkeypatch):
    flow = random_flow(**VIDEO)
    x = mx.random.normal((1, 2, C, 4, 4), key=mx.random.key(3))
    text, text_null = (mx.random.normal((1, TXT, WIDTH), key=mx.random.key(k)) for k in (4, 5))
    prefixes = {}
    for name, chunk in (("chunked", lambda x: 5), ("whole", lambda x: None)):
        monkeypatch.setattr(StarFlow, "score_chunk", lambda self, x, chunk=chunk: chunk(x))
        prefixes[name] = flow.prefill(x, text, 2.0, text_null, frames=4)
    chunked, whole = prefixes["chunked"], prefixes["whole"]
    assert maxerr(chunked.tokens[0], whole.tokens[0]) == 0.0  # the given latent itself
    for ours, theirs in zip(chunked.tokens[1:], whole.tokens[1:]):
        assert maxerr(ours, theirs) <= EXACT
    for block_caches, whole_caches in zip(chunked.caches, whole.caches):
        for ours, theirs in zip(block_caches, whole_caches):
            assert ours.offset == theirs.offset
            assert maxerr(ours.keys[:, :, : ours.offset], theirs.keys[:, :, : theirs.offset]) <= EXACT
            assert maxerr(ours.values[:, :, : ours.offset], theirs.values[:, :, : theirs.offset]) <= EXACT
    z = mx.random.normal((1, 4, C, 4, 4), key=mx.random.key(6))
    samples = [flow.reverse(z, None, prefix=p) for p in (chunked, whole)]
    assert maxerr(samples[0], samples[1]) <= 1e-4  # the inverse amplifies float32 differences a little


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_a_bad_chunk_is_refused(chunk):
    flow = random_flow()
    x, text = mx.zeros((1, C, 4, 4)), mx.zeros((1, TXT, WIDTH))
    assert refusal(lambda: flow(x, text, chunk=chunk)).startswith("chunk must be")


def peak_of(call) -> int:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = call()
    mx.eval(out.z, out.logdets)
    return mx.get_peak_memory() - base


def test_the_chunked_pass_memory_does_not_grow_with_the_clip_as_the_whole_one_does():
    """Frames of 16 x 16 tokens: the whole-sequence pass holds S x S attention scores (quadratic in the clip), the
    chunked one a frame's against the cache (linear, like the outputs)."""
    flow = random_flow(img_size=16, layers=(1, 2), **VIDEO)
    text = mx.random.normal((1, TXT, WIDTH), key=mx.random.key(2))
    peaks = {}
    for frames in (2, 6):
        x = mx.random.normal((1, frames, C, 16, 16), key=mx.random.key(frames))
        peaks["whole", frames] = peak_of(lambda: flow.forward(x, text))
        peaks["chunked", frames] = peak_of(lambda: flow(x, text))
    whole_growth = peaks["whole", 6] - peaks["whole", 2]
    chunked_growth = peaks["chunked", 6] - peaks["chunked", 2]
    assert peaks["chunked", 6] < peaks["whole", 6] / 3, peaks
    assert chunked_growth < whole_growth / 4, peaks


# ----------------------------------------------------------------------------------------------------------------
# A clip 3x the training length
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_clip(eager):
    return measured(frames=LONG_FRAMES, stream_frames=False)


@pytest.mark.parametrize("stage", ["sampling", "sample", "decode"])
def test_a_clip_three_times_the_training_length_keeps_memory_flat(stage, eager, long_clip):
    """``sampling``: the sampler alone (the deep block's sliding window of 5 latent frames); ``sample``: with the
    record's bits/dim (the chunked pass); ``decode``: the VAE, one latent frame at a time, whose output, the clip,
    is held as the decoded frames, their concatenation and the float32 copy handed out: three copies of the longer
    clip's extra frames. Not streamed, so that each stage holds only its own work."""
    (short, short_memory, _), (long, long_memory, _) = eager, long_clip
    assert short.frames.shape[1] == TRAINED_FRAMES and long.frames.shape[1] == LONG_FRAMES
    output = 3 * (long.frames.nbytes - short.frames.nbytes) if stage == "decode" else 0
    bound = (1 + FLAT) * short_memory.peak[stage] + output
    assert long_memory.peak[stage] <= bound, (short_memory.peak, long_memory.peak)


def test_a_clip_three_times_the_training_length_keeps_denoising_memory_flat(long_clip):
    """The denoiser runs over chunks of the sliding window widened past its shared frames (11 latent frames for the
    shipped model, whose 1x clip has 5): flat from there on, so a 4x clip (17 latent frames) costs what the 3x one
    (13) does."""
    (_, long_memory, _), (_, longer_memory, _) = long_clip, measured(frames=LONGER_FRAMES, stream_frames=False)
    assert longer_memory.peak["denoise"] <= (1 + FLAT) * long_memory.peak["denoise"]


def test_a_streamed_clip_three_times_the_training_length_keeps_its_peak_flat(eager):
    """Streamed, the denoiser and the decoder run inside the sample stage: the run's peak over every stage is what
    must stay flat (the output frames apart, as above)."""
    short, short_memory, _ = measured()
    long, long_memory, _ = measured(frames=LONG_FRAMES)
    output = 3 * (long.frames.nbytes - short.frames.nbytes)
    assert max(long_memory.peak.values()) <= (1 + FLAT) * max(short_memory.peak.values()) + output
