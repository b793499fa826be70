"""Every public entry of the flow, the sampler, the T5 encoder and the codecs refuses a wrong argument with one
``ValueError`` naming the argument, the expected and the actual value, before doing any work; no combination of
sampler settings and clip length loops forever; out-of-vocabulary token ids never reach the embedding gather; and
the valid edge cases still work and give the numbers they must.

Tiny models built in memory (random MLX init): the arguments matter here, not the weights.
"""

from __future__ import annotations

import json
import re
import signal
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.codec import LatentCodec
from starflow_mlx.config import FlowConfig
from starflow_mlx.flow import StarFlow
from starflow_mlx.sampler import (
    FramesDenoised, Jacobi, SamplerOptions, WindowMoved, sample, stream_denoise, stream_sample,
)
from starflow_mlx.sd_vae import SDVAE, SDVAEConfig
from starflow_mlx.t5 import T5Config, T5Encoder, encode_prompts
from starflow_mlx.wan_vae import WanVAE, WanVAEConfig
from tests.helpers import maxerr, refusal, run_bounded

C, S, L, D = 3, 4, 3, 8  # latent channels, latent size, txt_size, txt_dim; patch size 2: 2x2 tokens per frame
TINY = dict(in_channels=C, img_size=S, channels=32, layers_per_block=[1, 1], txt_size=L, txt_dim=D, head_dim=32,
            patch_size=2, seq_order="L2R")
GUIDED = SamplerOptions(guidance=2.0)


def _video_flow() -> StarFlow:
    """STARFlow-V shaped: temporal-causal deep block, shallow blocks within frames, a conditional denoiser."""
    mx.random.seed(0)
    return StarFlow(FlowConfig(**TINY, temporal_causal=2, shallow_block_local=True, learnable_self_denoiser=True,
                               conditional_denoiser=True, vid_size="9:16"))


@pytest.fixture(scope="module")
def flow() -> StarFlow:
    return _video_flow()


@pytest.fixture(scope="module")
def image_flow() -> StarFlow:
    """STARFlow (T2I) shaped: no learnable denoiser, so denoising is the gradient step."""
    mx.random.seed(1)
    return StarFlow(FlowConfig(**TINY))


def latent(batch=1, frames=2, seed=0, h=S, w=S) -> mx.array:
    return mx.random.normal((batch, frames, C, h, w), key=mx.random.key(seed))


def text(batch=1, seed=10, length=L, width=D) -> mx.array:
    return mx.random.normal((batch, length, width), key=mx.random.key(seed))


@contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the run) if the block takes longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"did not finish within {seconds} s: an endless loop?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(call, message: str):
    """``call()`` raises ValueError matching ``message``, before any work: a stream refuses when called, so
    not a single event is produced."""
    with deadline(30):
        text = refusal(call)
    assert re.search(message, text), text


# ----------------------------------------------------------------------------------------------------------------
# The flow's entries: every latent, text, text_null, guidance and prefix argument
# ----------------------------------------------------------------------------------------------------------------

# entry -> (name of its latent argument, call(flows, latent, text, text_null)); the image flow for the gradient step
ENTRIES = {
    "forward": ("x", lambda f, x, y, n: f.video(x, y)),
    "nll": ("x", lambda f, x, y, n: f.video.nll(x, y)),
    "prefill": ("x", lambda f, x, y, n: f.video.prefill(x, y, 2.0, n)),
    "reverse": ("z", lambda f, x, y, n: f.video.reverse(x, y, n, GUIDED)),
    "sample": ("z", lambda f, x, y, n: sample(f.video, x, y, n, GUIDED)),
    "stream_sample": ("z", lambda f, x, y, n: stream_sample(f.video, x, y, n, GUIDED)),
    "denoise": ("x", lambda f, x, y, n: f.video.denoise(x, y)),
    "stream_denoise": ("x", lambda f, x, y, n: stream_denoise(f.video, x, y)),
    "predict_noise": ("x", lambda f, x, y, n: f.video.predict_noise(x, y, True)),
    "gradient_denoise": ("x", lambda f, x, y, n: f.image.gradient_denoise(x, y)),
    "denoise-gradient": ("x", lambda f, x, y, n: f.image.denoise(x, y)),
}
GUIDED_ENTRIES = ("prefill", "reverse", "sample", "stream_sample")


class Flows:
    def __init__(self, video, image):
        self.video, self.image = video, image


@pytest.fixture(scope="module")
def flows(flow, image_flow) -> Flows:
    return Flows(flow, image_flow)


def _wrong_channels(x):
    return mx.zeros((*x.shape[:2], C + 1, S, S))


# (id, bad latent from a good one, message with {name})
LATENT_CASES = [
    ("numpy", lambda x: np.array(x), r"{name} must be an mlx array .*got numpy.ndarray of shape \[1, 2, 3, 4, 4\] "
                                     r"and dtype float32: convert it with mx.array"),
    ("list", lambda x: x.tolist(), r"{name} must be an mlx array .*got list: convert it with mx.array"),
    ("none", lambda x: None, r"{name} must be an mlx array .*got None"),
    ("int32", lambda x: x.astype(mx.int32), r"{name} must be a floating-point array, got dtype mlx.core.int32"),
    ("bool", lambda x: x > 0, r"{name} must be a floating-point array, got dtype mlx.core.bool"),
    ("rank-3", lambda x: x[0, 0], r"{name} must be .*\(B, T, C, H, W\) video latent, got shape \[3, 4, 4\]"),
    ("rank-6", lambda x: x[None], r"{name} must be .*video latent, got shape \[1, 1, 2, 3, 4, 4\]"),
    ("empty-batch", lambda x: x[:0], r"{name} must be .* with no empty axis, got shape \[0, 2, 3, 4, 4\]"),
    ("zero-frames", lambda x: x[:, :0], r"{name} must be .* with no empty axis, got shape \[1, 0, 3, 4, 4\]"),
    ("zero-width", lambda x: x[..., :0], r"{name} must be .* with no empty axis, got shape \[1, 2, 3, 4, 0\]"),
    ("channels", _wrong_channels, r"{name} must have in_channels = 3 channels \(axis 2\), got shape \[1, 2, 4, 4, 4\]"),
    ("odd-height", lambda x: x[..., :3, :], r"{name} height and width must be multiples of patch_size 2, got 3x4"),
    ("odd-width", lambda x: mx.zeros((1, 2, C, S, 5)),
     r"{name} height and width must be multiples of patch_size 2, got 4x5"),
]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case, bad, message", LATENT_CASES, ids=[c[0] for c in LATENT_CASES])
def test_latent_refused(flows, entry, case, bad, message):
    name, call = ENTRIES[entry]
    refused(lambda: call(flows, bad(latent()), text(), text()), message.format(name=name))


def test_image_latent_refused_where_a_video_is_required(flows):
    refused(lambda: flows.video.predict_noise(latent()[:, 0], text(), True),
            r"x must be \(B, T, C, H, W\) video latent, got shape \[1, 3, 4, 4\]")


EXPECTED_TEXT = r"\(B, L, D\) = \(1, 3, 8\) \(B: the latent's batch, L: txt_size, D: txt_dim\)"
TEXT_CASES = [
    ("none", lambda y: None, rf"text is required: the flow is text-conditioned; pass the T5 embedding of the "
                             rf"prompt, {EXPECTED_TEXT}"),
    ("numpy", lambda y: np.array(y), r"text must be an mlx array .*got numpy.ndarray of shape \[1, 3, 8\]"),
    ("int32", lambda y: y.astype(mx.int32), r"text must be a floating-point array, got dtype mlx.core.int32"),
    ("rank-2", lambda y: y[0], rf"text must be {EXPECTED_TEXT}, got shape \[3, 8\]"),
    ("batch", lambda y: mx.concatenate([y, y]), rf"text must be {EXPECTED_TEXT}, got shape \[2, 3, 8\]"),
    ("length-short", lambda y: y[:, :2], rf"text must be {EXPECTED_TEXT}, got shape \[1, 2, 8\]"),
    ("length-long", lambda y: text(length=L + 1), rf"text must be {EXPECTED_TEXT}, got shape \[1, 4, 8\]"),
    ("width", lambda y: text(width=D * 2), rf"text must be {EXPECTED_TEXT}, got shape \[1, 3, 16\]"),
    ("empty", lambda y: y[:, :0], r"text must be .* with no empty axis, got shape \[1, 0, 8\]"),
]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case, bad, message", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_refused(flows, entry, case, bad, message):
    refused(lambda: ENTRIES[entry][1](flows, latent(), bad(text()), text()), message)


TEXT_NULL_CASES = [
    ("missing", lambda n: None, r"guidance 2.0 > 0 needs the unconditional text embedding text_null \(1 or 1, 3, 8\)"),
    ("numpy", lambda n: np.array(n), r"text_null must be an mlx array \(1 or 1, 3, 8\) like text, got numpy.ndarray"),
    ("float64-list", lambda n: n.tolist(), r"text_null must be an mlx array .*got list"),
    ("int32", lambda n: n.astype(mx.int32), r"text_null must be a floating-point array, got dtype mlx.core.int32"),
    ("rows", lambda n: mx.concatenate([n, n]), r"text_null must be \(1 or 1, 3, 8\) like text, got shape \[2, 3, 8\]"),
    ("length", lambda n: n[:, :2], r"text_null must be \(1 or 1, 3, 8\) like text, got shape \[1, 2, 8\]"),
    ("width", lambda n: text(width=4), r"text_null must be \(1 or 1, 3, 8\) like text, got shape \[1, 3, 4\]"),
    ("rank-2", lambda n: n[0], r"text_null must be \(1 or 1, 3, 8\) like text, got shape \[3, 8\]"),
]


@pytest.mark.parametrize("entry", GUIDED_ENTRIES)
@pytest.mark.parametrize("case, bad, message", TEXT_NULL_CASES, ids=[c[0] for c in TEXT_NULL_CASES])
def test_text_null_refused(flows, entry, case, bad, message):
    refused(lambda: ENTRIES[entry][1](flows, latent(), text(), bad(text(seed=11))), message)


GUIDANCE_CASES = [
    ("nan", float("nan"), "guidance must be a finite number, got float nan"),
    ("inf", float("inf"), "guidance must be a finite number, got float inf"),
    ("negative", -1.0, r"guidance must be >= 0, got -1.0"),
    ("string", "2", "guidance must be a finite number, got str '2'"),
    ("bool", True, "guidance must be a finite number, got bool True"),
    ("none", None, "guidance must be a finite number, got None"),
    ("array", mx.array([1.0, 2.0]), r"guidance must be a finite number, got mlx.core.array of shape \[2\]"),
    ("huge", 1e308, r"guidance must be <= 100.0, got 1e\+308"),
    ("above-bound", 100.5, r"guidance must be <= 100.0, got 100.5"),
]


@pytest.mark.parametrize("entry", ["forward", "prefill"])
@pytest.mark.parametrize("case, guidance, message", GUIDANCE_CASES, ids=[c[0] for c in GUIDANCE_CASES])
def test_guidance_refused(flow, entry, case, guidance, message):
    call = {"forward": lambda: flow(latent(batch=2), text(batch=2), guidance),
            "prefill": lambda: flow.prefill(latent(), text(), guidance, text())}[entry]
    refused(call, message)


@pytest.mark.parametrize("guidance", [1e308, 100.01, float("inf"), -0.5], ids=["huge", "above-bound", "inf",
                                                                                 "negative"])
def test_sampler_options_guidance_bounded(guidance):
    refused(lambda: SamplerOptions(guidance=guidance),
            rf"SamplerOptions.guidance must be a finite number in \[0, 100.0\], got {re.escape(repr(guidance))}")


def test_guidance_at_the_bound_samples_finite_values(flow):
    out = flow.reverse(latent(), text(), text(seed=11), SamplerOptions(guidance=100.0))
    assert bool(mx.isfinite(out).all())


# Which argument of an entry holds the NaN or inf: (argument name, call(flows, bad value)).
NON_FINITE_ARGUMENTS = {
    "latent": lambda entry: (ENTRIES[entry][0], lambda f, bad: ENTRIES[entry][1](f, bad(latent()), text(), text())),
    "text": lambda entry: ("text", lambda f, bad: ENTRIES[entry][1](f, latent(), bad(text()), text())),
    "text_null": lambda entry: ("text_null", lambda f, bad: ENTRIES[entry][1](f, latent(), text(), bad(text()))),
}
NON_FINITE_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
NON_FINITE_CASES = [(entry, argument, value) for entry in ENTRIES for argument in NON_FINITE_ARGUMENTS
                    for value in NON_FINITE_VALUES if argument != "text_null" or entry in GUIDED_ENTRIES]


@pytest.mark.parametrize("entry, argument, value", NON_FINITE_CASES, ids=["-".join(c) for c in NON_FINITE_CASES])
def test_non_finite_inputs_refused(flows, entry, argument, value):
    """One NaN or inf anywhere in a latent or an embedding is named, instead of sampling NaN silently."""

    def poison(x):
        flat = x.flatten()
        flat[flat.size // 2] = NON_FINITE_VALUES[value]
        return flat.reshape(x.shape)

    name, call = NON_FINITE_ARGUMENTS[argument](entry)
    refused(lambda: call(flows, poison), rf"{name} holds NaN or inf values; expected finite numbers")


def test_guided_forward_needs_an_even_batch(flow):
    refused(lambda: flow(latent(batch=3), text(batch=3), 1.0),
            r"guidance > 0 needs an even batch of rows \[cond; uncond\], got batch 3")


OPTIONS_CASES = [
    ("dict", {"guidance": 2.0}, "options must be a SamplerOptions, got dict"),
    ("jacobi", Jacobi(), "options must be a SamplerOptions, got Jacobi"),
    ("float", 2.0, "options must be a SamplerOptions, got float"),
]


@pytest.mark.parametrize("entry", ["reverse", "sample", "stream_sample"])
@pytest.mark.parametrize("case, options, message", OPTIONS_CASES, ids=[c[0] for c in OPTIONS_CASES])
def test_options_refused(flow, entry, case, options, message):
    call = {"reverse": lambda: flow.reverse(latent(), text(), None, options),
            "sample": lambda: sample(flow, latent(), text(), None, options),
            "stream_sample": lambda: stream_sample(flow, latent(), text(), None, options)}[entry]
    refused(call, message)


# The old API's window/context infinite loop and every other endless setting are refused where they are built.
SETTINGS_CASES = [
    ("overlap-equals-window", lambda: SamplerOptions(window=2, overlap=2),
     r"overlap \(2\) must be smaller than window \(2\)"),
    ("overlap-above-window", lambda: SamplerOptions(window=2, overlap=5),
     r"overlap \(5\) must be smaller than window \(2\)"),
    ("window-0", lambda: SamplerOptions(window=0), "window must be >= 1 latent frame, got 0"),
    ("window-negative", lambda: SamplerOptions(window=-3, overlap=0), "window must be >= 1 latent frame, got -3"),
    ("overlap-negative", lambda: SamplerOptions(window=3, overlap=-1), "overlap must be >= 0 latent frames, got -1"),
    ("window-float", lambda: SamplerOptions(window=2.0), "SamplerOptions.window must be an integer, got 2.0"),
    ("block-size-0", lambda: Jacobi(block_size=0), "Jacobi.block_size must be >= 1, got 0"),
    ("max-iter-0", lambda: Jacobi(max_iter=0), "Jacobi.max_iter must be >= 1, got 0"),
    ("growth-0", lambda: Jacobi(growth=0), "Jacobi.growth must be >= 1, got 0"),
    ("block-size-float", lambda: Jacobi(block_size=1.5), "Jacobi.block_size must be an integer, got 1.5"),
    ("threshold-nan", lambda: Jacobi(threshold=float("nan")), "Jacobi.threshold must be a finite number, got nan"),
]


@pytest.mark.parametrize("case, build, message", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_endless_sampler_settings_refused(case, build, message):
    refused(build, message)


def test_overlap_too_large_for_the_models_window_refused_before_sampling(flow, monkeypatch):
    monkeypatch.setattr(flow.config, "local_attn_window", 2)
    refused(lambda: stream_sample(flow, latent(frames=3), text(), None, SamplerOptions(overlap=4)),
            r"overlap \(4\) must be smaller than window \(2\)")


# ---- prefixes ----


def _prefix(flow, frames=1, batch=1, guidance=0.0, h=S, w=S, total=None):
    return flow.prefill(latent(batch, frames, seed=5, h=h, w=w), text(batch), guidance,
                        text(batch, seed=11) if guidance else None, frames=total)


PREFIX_CASES = [
    ("not-a-prefix", lambda f: {"caches": []}, lambda f, p: f.reverse(latent(frames=3), None, None, None, p),
     "prefix must be a Prefix from StarFlow.prefill, got dict"),
    ("other-model", lambda f: _prefix(_video_flow()), lambda f, p: f.reverse(latent(frames=3), None, None, None, p),
     "prefix was made by another model: make it with this model's prefill"),
    ("other-batch", lambda f: _prefix(f, batch=2), lambda f, p: f.reverse(latent(frames=3), None, None, None, p),
     "z has batch 1, the prefix was made for batch 2"),
    ("other-size", lambda f: _prefix(f, w=2 * S), lambda f, p: f.reverse(latent(frames=3), None, None, None, p),
     "z has 4x4 latent frames, the prefix was made for 4x8"),
    ("no-frames-left", lambda f: _prefix(f, frames=2), lambda f, p: f.reverse(latent(frames=2), None, None, None, p),
     "z must have more latent frames than the prefix's 2, got 2"),
    ("image-z", lambda f: _prefix(f), lambda f, p: f.reverse(latent()[:, 0], None, None, None, p),
     "z must have more latent frames than the prefix's 1, got 1"),
    ("other-text", lambda f: _prefix(f), lambda f, p: f.reverse(latent(frames=3), text(seed=99), None, None, p),
     r"text / text_null differ from the ones the prefix was made with \(StarFlow.prefill\): pass those, or neither"),
    ("other-text-null", lambda f: _prefix(f, guidance=2.0),
     lambda f, p: f.reverse(latent(frames=3), text(), text(seed=98), GUIDED, p),
     r"text / text_null differ from the ones the prefix was made with"),
    ("text-null-without-text", lambda f: _prefix(f, guidance=2.0),
     lambda f, p: f.reverse(latent(frames=3), None, text(seed=11), None, p),
     r"text_null was given without text: with a prefix, pass both \(as given to prefill\) or neither"),
    ("other-guidance", lambda f: _prefix(f, guidance=2.0),
     lambda f, p: f.reverse(latent(frames=3), None, None, SamplerOptions(guidance=1.0), p),
     "options.guidance 1.0 differs from the prefix's guidance 2.0"),
    ("unguided-options", lambda f: _prefix(f, guidance=2.0),
     lambda f, p: f.reverse(latent(frames=3), None, None, SamplerOptions(), p),
     "options.guidance 0.0 differs from the prefix's guidance 2.0"),
    ("wrong-text-shape", lambda f: _prefix(f), lambda f, p: f.reverse(latent(frames=3), text()[:, :2], None, None, p),
     r"text must be \(B, L, D\) = \(1, 3, 8\)"),
]


@pytest.mark.parametrize("case, make, call, message", PREFIX_CASES, ids=[c[0] for c in PREFIX_CASES])
def test_prefix_refused(flow, case, make, call, message):
    prefix = make(flow)
    refused(lambda: call(flow, prefix), message)
    if hasattr(prefix, "used"):
        assert not prefix.used  # a refused call leaves the prefix usable


def test_prefix_serves_one_sample(flow):
    prefix = _prefix(flow)
    first = flow.reverse(latent(frames=3), None, None, None, prefix)
    assert first.shape == (1, 3, C, S, S)
    refused(lambda: flow.reverse(latent(frames=3), None, None, None, prefix),
            r"prefix was already sampled from \(sampling extends its caches\): make a new one with prefill")


PREFILL_FRAMES_CASES = [
    ("zero", 0, r"frames \(the clip's latent frames, given ones included\) must be >= 2, got 0"),
    ("fewer-than-given", 1, r"frames \(.*\) must be >= 2, got 1"),
    ("float", 3.0, r"frames \(.*\) must be an integer >= 2 or None, got float 3.0"),
    ("bool", True, r"frames \(.*\) must be an integer >= 2 or None, got bool True"),
    ("string", "4", r"frames \(.*\) must be an integer >= 2 or None, got str '4'"),
]


@pytest.mark.parametrize("case, frames, message", PREFILL_FRAMES_CASES, ids=[c[0] for c in PREFILL_FRAMES_CASES])
def test_prefill_frames_refused(flow, case, frames, message):
    refused(lambda: flow.prefill(latent(frames=2), text(), frames=frames), message)


# ---- denoising ----

WINDOW_CASES = [
    ("zero", 0, "window must be >= 1, got 0"),
    ("negative", -2, "window must be >= 1, got -2"),
    ("float", 1.5, "window must be an integer >= 1 or None, got float 1.5"),
    ("bool", True, "window must be an integer >= 1 or None, got bool True"),
    ("string", "2", "window must be an integer >= 1 or None, got str '2'"),
]


@pytest.mark.parametrize("entry", ["denoise", "stream_denoise"])
@pytest.mark.parametrize("case, window, message", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_denoise_window_refused(flow, entry, case, window, message):
    call = {"denoise": lambda: flow.denoise(latent(), text(), window),
            "stream_denoise": lambda: stream_denoise(flow, latent(), text(), window)}[entry]
    refused(call, message)


SIGMA_CASES = [
    ("zero", 0.0, "sigma must be > 0, got 0.0"),
    ("negative", -0.3, "sigma must be > 0, got -0.3"),
    ("nan", float("nan"), "sigma must be a finite number, got float nan"),
    ("inf", float("inf"), "sigma must be a finite number, got float inf"),
    ("string", "0.3", "sigma must be a finite number, got str '0.3'"),
    ("bool", True, "sigma must be a finite number, got bool True"),
]


@pytest.mark.parametrize("case, sigma, message", SIGMA_CASES, ids=[c[0] for c in SIGMA_CASES])
def test_sigma_refused(image_flow, case, sigma, message):
    refused(lambda: image_flow.gradient_denoise(latent(), text(), sigma), message)


def test_predict_noise_video_flag_and_missing_denoiser_refused(flow, image_flow):
    refused(lambda: flow.predict_noise(latent(), text(), 1), "video must be True or False, got int 1")
    refused(lambda: image_flow.predict_noise(latent(), text(), True),
            r"this flow has no learnable denoiser \(learnable_self_denoiser is off\): use gradient_denoise")


@pytest.mark.parametrize("denoiser_window", [2, 3, -1], ids=["equal-to-chunk", "above-chunk", "negative"])
def test_denoiser_window_that_would_not_move_refused_before_any_chunk(flow, monkeypatch, denoiser_window):
    monkeypatch.setattr(flow.config, "denoiser_window", denoiser_window)
    refused(lambda: stream_denoise(flow, latent(frames=3), text(), window=2),
            rf"denoiser_window {denoiser_window} must be >= 0 and smaller than the 2-frame chunk")


# ----------------------------------------------------------------------------------------------------------------
# Nothing loops forever: every window / overlap / clip length / prefix combination ends, with the window schedule
# worked out by hand (the window ends at frame min(T, w), then moves to end overlap frames + (w - overlap) later)
# ----------------------------------------------------------------------------------------------------------------

# (id, frames, prefix frames, options, first frames of the windows after each move)
SCHEDULES = [
    ("window-larger-than-clip", 2, 0, SamplerOptions(window=5), []),
    ("window-1-overlap-0", 3, 0, SamplerOptions(window=1, overlap=0), [1, 2]),
    ("window-1-default-overlap", 3, 0, SamplerOptions(window=1), [1, 2]),
    ("window-equals-clip", 3, 0, SamplerOptions(window=3, overlap=2), []),
    ("window-2-overlap-1", 5, 0, SamplerOptions(window=2, overlap=1), [1, 2, 3]),
    ("window-3-overlap-0", 5, 0, SamplerOptions(window=3, overlap=0), [3]),
    ("one-frame-clip", 1, 0, SamplerOptions(window=1, overlap=0), []),
    ("prefix-longer-than-window", 5, 3, SamplerOptions(window=2, overlap=1), [2, 3]),
    ("prefix-equals-window", 4, 2, SamplerOptions(window=2, overlap=1), [1, 2]),
    ("prefix-window-1", 3, 1, SamplerOptions(window=1, overlap=0), [1, 2]),
    ("huge-jacobi-chunks", 2, 0, SamplerOptions(solver=Jacobi(block_size=1000, growth=1000, max_iter=2)), []),
    ("jacobi-1-token-1-pass", 3, 0, SamplerOptions(window=2, overlap=1, solver=Jacobi(block_size=1, max_iter=1)), [1]),
    ("stream-frames-with-window", 3, 0, SamplerOptions(window=2, overlap=1, stream_frames=True), [1]),
]


@pytest.mark.parametrize("case, frames, given, options, moves", SCHEDULES, ids=[c[0] for c in SCHEDULES])
def test_sampling_always_ends(flow, case, frames, given, options, moves):
    prefix = _prefix(flow, frames=given, total=frames) if given else None
    with deadline(60):
        events = list(stream_sample(flow, latent(frames=frames), None if prefix else text(), None, options, prefix))
    assert events[-1].latent.shape == (1, frames, C, S, S)
    assert bool(mx.all(mx.isfinite(events[-1].latent)))
    assert [e.first_frame for e in events if isinstance(e, WindowMoved)] == moves
    if prefix is not None:  # the given frames come back out
        assert maxerr(events[-1].latent[:, :given], latent(frames=given, seed=5)) <= 1e-4


# (id, frames, window, expected (start, stop) of each FramesDenoised); denoiser_window None: overlap window - 1
DENOISE_SCHEDULES = [
    ("window-1", 3, 1, [(0, 1), (1, 2), (2, 3)]),
    ("window-2", 3, 2, [(0, 2), (2, 3)]),
    ("window-equals-clip", 3, 3, [(0, 3)]),
    ("window-larger-than-clip", 2, 9, [(0, 2)]),
    ("one-frame", 1, 1, [(0, 1)]),
]


@pytest.mark.parametrize("case, frames, window, chunks", DENOISE_SCHEDULES, ids=[c[0] for c in DENOISE_SCHEDULES])
def test_denoising_always_ends(flow, case, frames, window, chunks):
    x = latent(frames=frames)
    with deadline(60):
        events = list(stream_denoise(flow, x, text(), window))
    assert [(e.start, e.stop) for e in events if isinstance(e, FramesDenoised)] == chunks
    assert events[-1].latent.shape == x.shape and maxerr(events[-1].latent, x) > 0


# ----------------------------------------------------------------------------------------------------------------
# Valid edge cases still work, with the numbers they must give
# ----------------------------------------------------------------------------------------------------------------


def test_one_frame_video_is_the_image(flow):
    z, y = latent(frames=1), text()
    assert maxerr(flow.reverse(z, y)[:, 0], flow.reverse(z[:, 0], y)) <= 1e-6


def test_window_equal_to_the_clip_changes_nothing(flow):
    z, y = latent(frames=3), text()
    assert maxerr(flow.reverse(z, y, None, SamplerOptions(window=3)), flow.reverse(z, y)) == 0.0


def test_batch_two_with_one_row_text_null(flow):
    z, y, y_null = latent(batch=2, frames=2), text(batch=2), text(seed=11)
    both = flow.reverse(z, y, y_null, GUIDED)
    assert maxerr(both, flow.reverse(z, y, mx.concatenate([y_null, y_null]), GUIDED)) == 0.0
    assert maxerr(both[:1], flow.reverse(z[:1], y[:1], y_null, GUIDED)) <= 1e-5
    assert maxerr(both[0], both[1]) > 0.1  # two different samples


def test_prefix_then_reverse_without_repeating_text(flow):
    """Omitting text, text_null and options samples with the prefix's: the same as repeating them exactly."""
    z, y, y_null = latent(frames=3), text(), text(seed=11)
    given = latent(frames=1, seed=5)
    omitted = flow.reverse(z, None, None, None, flow.prefill(given, y, 2.0, y_null, frames=3))
    repeated = flow.reverse(z, y, y_null, GUIDED, flow.prefill(given, y, 2.0, y_null, frames=3))
    assert maxerr(omitted, repeated) == 0.0
    assert maxerr(omitted[:, :1], given) <= 1e-4
    assert maxerr(omitted[:, 1:], flow.reverse(z, y, y_null, GUIDED)[:, 1:]) > 1e-3  # the prefix matters


def test_other_aspect_ratio_round_trips(flow):
    """RoPE scales positions by the frame's size, so a 4x8 latent works: forward(reverse(z)) = z."""
    z, y = latent(frames=2, w=2 * S), text()
    x = flow.reverse(z, y)
    assert x.shape == z.shape and maxerr(flow(x, y).z, z) <= 1e-4


def test_numpy_integers_and_array_scalars_are_accepted(flow, image_flow):
    x, y = latent(frames=3), text()
    assert maxerr(flow.denoise(x, y, np.int64(2)), flow.denoise(x, y, 2)) == 0.0
    assert maxerr(image_flow.gradient_denoise(x, y, np.float32(0.5)), image_flow.gradient_denoise(x, y, 0.5)) == 0.0
    assert maxerr(flow(x, y, mx.array(0.0)).z, flow(x, y).z) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# T5: token ids and attention mask
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 50
T5_TINY = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def t5() -> T5Encoder:
    mx.random.seed(2)
    return T5Encoder(T5Config(**T5_TINY))


IDS = mx.array([[3, 7, 1, 0]], dtype=mx.int32)
MASK = mx.array([[1, 1, 1, 0]], dtype=mx.int32)
T5_CASES = [
    ("ids-numpy", lambda: (np.array(IDS), MASK), r"input_ids must be an mlx array \(B, L\) of token ids, got numpy"),
    ("ids-list", lambda: ([[3, 7]], MASK), r"input_ids must be an mlx array .*got list"),
    ("ids-float", lambda: (IDS.astype(mx.float32), MASK),
     "input_ids must be an integer array, got dtype mlx.core.float32"),
    ("ids-bool", lambda: (IDS > 2, MASK), "input_ids must be an integer array, got dtype mlx.core.bool"),
    ("ids-1d", lambda: (IDS[0], MASK), r"input_ids must be \(B, L\) of token ids, got shape \[4\]"),
    ("ids-3d", lambda: (IDS[None], MASK), r"input_ids must be \(B, L\) of token ids, got shape \[1, 1, 4\]"),
    ("ids-empty", lambda: (IDS[:, :0], MASK), r"no empty axis, got shape \[1, 0\]"),
    ("id-equals-vocab", lambda: (mx.array([[3, VOCAB]]), MASK),
     r"input_ids must lie in \[0, 50\) \(the vocabulary\), got token id 50"),
    ("id-huge", lambda: (mx.array([[2**31 - 1, 3]]), MASK), r"got token id 2147483647"),
    ("id-negative", lambda: (mx.array([[-1, 3]]), MASK), r"input_ids must lie in \[0, 50\) .*got token id -1"),
    ("id-uint-oov", lambda: (mx.array([[3, 60000]], dtype=mx.uint16), MASK), "got token id 60000"),
    ("mask-shape", lambda: (IDS, MASK[:, :3]),
     r"attention_mask must have the shape of input_ids \[1, 4\], got \[1, 3\]"),
    ("mask-numpy", lambda: (IDS, np.array(MASK)),
     r"attention_mask must be an mlx array \[1, 4\] like input_ids, got numpy"),
    ("mask-value-2", lambda: (IDS, mx.array([[1, 2, 1, 0]])),
     r"attention_mask must hold only 0 and 1, got values in \[0, 2\]"),
    ("mask-half", lambda: (IDS, mx.array([[1, 0.5, 1, 0]])),
     r"attention_mask must hold only 0 and 1, got values in \[0.0, 1.0\]"),
]


@pytest.mark.parametrize("entry", ["call", "encode"])
@pytest.mark.parametrize("case, args, message", T5_CASES, ids=[c[0] for c in T5_CASES])
def test_t5_arguments_refused(t5, entry, case, args, message):
    ids, mask = args()
    if entry == "call":
        refused(lambda: t5(ids, mask), message)
    else:
        refused(lambda: t5.encode(ids, mask), message)


def test_t5_encode_requires_the_mask(t5):
    refused(lambda: t5.encode(IDS, None), r"attention_mask is required: a \(B, L\) array of 1 for tokens")


def _no_tokenizer(*_):
    raise AssertionError("the tokenizer must not run on refused arguments")


ENCODE_PROMPTS_CASES = [
    ("texts-int", 5, 4, "texts must be a prompt or a non-empty list of prompts"),
    ("texts-empty", [], 4, r"texts must be a prompt or a non-empty list of prompts \(str\), got an empty list"),
    ("texts-mixed", ["a cat", 3], 4, r"texts\[1\] must be a prompt \(str\), got int 3"),
    ("max-length-0", ["a cat"], 0, "max_length must be >= 1, got 0"),
    ("max-length-float", ["a cat"], 2.7, "max_length must be an integer >= 1, got float 2.7"),
    ("max-length-huge", ["a cat"], 10**10, "max_length must be <= 4096, got 10000000000"),
    ("lone-surrogate", ["a cat", "a \ud800 dog"], 4,
     r"texts\[1\] is not valid Unicode text: surrogates not allowed at character 2 \('\\ud800'\)"),
    ("texts-dict", {"a": 1}, 4, "texts must be a prompt or a non-empty list of prompts \\(str\\), got dict"),
]


@pytest.mark.parametrize("case, texts, max_length, message", ENCODE_PROMPTS_CASES,
                         ids=[c[0] for c in ENCODE_PROMPTS_CASES])
def test_encode_prompts_arguments_refused(t5, case, texts, max_length, message):
    refused(lambda: encode_prompts(t5, _no_tokenizer, texts, max_length), message)


def test_t5_valid_edges(t5):
    """The first and last ids of the vocabulary, a bool mask and a fully padded row all give finite numbers."""
    ids = mx.array([[0, VOCAB - 1, 5], [2, 3, 4]])
    out = t5.encode(ids, mx.array([[True, True, False], [False, False, False]]))
    assert out.shape == (2, 3, 16) and bool(mx.all(mx.isfinite(out)))
    assert float(mx.abs(out[1]).max()) == 0.0 and float(mx.abs(out[0, :2]).max()) > 0.1


# Out-of-vocabulary ids: MLX's gather does not bounds-check, so before the check they read outside the embedding
# table (NaN, garbage or a segfault). A subprocess under a memory and CPU limit, so a regression fails here.
OOV_SCRIPT = """
import json, sys
import mlx.core as mx
from starflow_mlx.t5 import T5Config, T5Encoder
model = T5Encoder(T5Config(**json.loads(sys.argv[1])))
results = {}
for name, ids in json.loads(sys.argv[2]).items():
    ids = mx.array(ids)
    try:
        out = model.encode(ids, mx.ones(ids.shape, dtype=mx.int32))
        results[name] = "finite" if bool(mx.all(mx.isfinite(out))) else "not finite"
    except ValueError as e:
        results[name] = "ValueError: " + str(e)
print(json.dumps(results))
"""
OOV_IDS = {"vocab": [[VOCAB, 1]], "far": [[10**9, 1]], "negative": [[-5, 1]], "int32-max": [[2**31 - 1, 0]],
           "last-valid": [[VOCAB - 1, 0]]}


@pytest.fixture(scope="module")
def oov_results():
    run = run_bounded(OOV_SCRIPT, json.dumps(T5_TINY), json.dumps(OOV_IDS), imports=("starflow_mlx.t5",))
    assert run.returncode == 0, f"the T5 subprocess died (rc {run.returncode}): {run.stderr[-2000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(OOV_IDS))
def test_out_of_vocabulary_ids_never_reach_the_gather(oov_results, case):
    if case == "last-valid":
        assert oov_results[case] == "finite"
    else:
        bad = OOV_IDS[case][0][0]
        message = f"input_ids must lie in [0, {VOCAB}) (the vocabulary), got token id {bad}"
        assert oov_results[case] == f"ValueError: {message}"


# ----------------------------------------------------------------------------------------------------------------
# Codecs: pixels, latents, noise, key, tiling and layout flags of both VAEs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codecs() -> dict[str, LatentCodec]:
    mx.random.seed(3)
    return {"wan": WanVAE(WanVAEConfig(base_dim=16, decoder_base_dim=24)),
            "sd": SDVAE(SDVAEConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4))}


def _codec_latent(vae):
    return mx.zeros((1, 1, vae.latent_channels, 2, 2))


def _pixels(vae):
    return mx.zeros((1, 1, 3, 2 * vae.spatial_factor, 2 * vae.spatial_factor))


CODEC_CASES = [
    ("decode-numpy", lambda v: v.from_flow_latent(np.array(_codec_latent(v))),
     "latent must be an mlx array .*got numpy"),
    ("decode-int", lambda v: v.from_flow_latent(_codec_latent(v).astype(mx.int32)),
     "latent must be a floating-point array, got dtype mlx.core.int32"),
    ("decode-rank-3", lambda v: v.from_flow_latent(_codec_latent(v)[0, 0]),
     r"latent must be .*got shape \[\d+, 2, 2\]"),
    ("decode-empty", lambda v: v.from_flow_latent(_codec_latent(v)[:, :0]), r"latent must be .*no empty axis"),
    ("decode-channels", lambda v: v.from_flow_latent(mx.zeros((1, 1, 5, 2, 2))), r"5 channels|channels in layout"),
    ("decode-channels-last-int", lambda v: v.from_flow_latent(_codec_latent(v), channels_last=1),
     "channels_last must be True or False, got int 1"),
    ("decode-tile-0", lambda v: v.from_flow_latent(_codec_latent(v), tile_size=0), "tile_size must be >= 1, got 0"),
    ("decode-tile-float", lambda v: v.from_flow_latent(_codec_latent(v), tile_size=2.5),
     "tile_size must be an integer >= 1 or None, got float 2.5"),
    ("decode-overlap-negative", lambda v: v.from_flow_latent(_codec_latent(v), tile_size=4, tile_overlap=-1),
     "tile_overlap must be >= 0, got -1"),
    ("decode-overlap-too-big", lambda v: v.from_flow_latent(_codec_latent(v), tile_size=4, tile_overlap=4),
     "tile_overlap must be smaller than tile_size 4, got 4"),
    ("stream-tile-0", lambda v: v.decode_stream(tile_size=0), "tile_size must be >= 1, got 0"),
    ("stream-channels-last-str", lambda v: v.decode_stream(channels_last="yes"),
     "channels_last must be True or False, got str 'yes'"),
    ("push-numpy", lambda v: v.decode_stream().push(np.zeros((1, v.latent_channels, 2, 2), np.float32)),
     "latent_frame must be an mlx array one latent frame .*got numpy"),
    ("push-video", lambda v: v.decode_stream().push(_codec_latent(v)),
     r"latent_frame must be one latent frame \(B, C, h, w\), got shape \[1, 1, \d+, 2, 2\]"),
    ("push-int", lambda v: v.decode_stream().push(_codec_latent(v)[:, 0].astype(mx.int32)),
     "latent_frame must be a floating-point array, got dtype mlx.core.int32"),
    ("encode-numpy", lambda v: v.to_flow_latent(np.array(_pixels(v))), "pixels must be an mlx array .*got numpy"),
    ("encode-uint8", lambda v: v.to_flow_latent(_pixels(v).astype(mx.uint8)),
     "pixels must be a floating-point array, got dtype mlx.core.uint8"),
    ("encode-rank-6", lambda v: v.encode(_pixels(v)[None]), r"pixels must be .*got shape \[1, 1, 1, 3, \d+, \d+\]"),
    ("noise-numpy", lambda v: v.to_flow_latent(_pixels(v), noise=np.zeros((1, 1, v.latent_channels, 2, 2))),
     "noise must be an mlx array .*got numpy"),
    ("key-int", lambda v: v.to_flow_latent(_pixels(v), key=5),
     r"key must be an mlx random key \(mx.random.key\(seed\)\) or None, got int"),
]


@pytest.mark.parametrize("codec", ["wan", "sd"])
@pytest.mark.parametrize("case, call, message", CODEC_CASES, ids=[c[0] for c in CODEC_CASES])
def test_codec_arguments_refused(codecs, codec, case, call, message):
    refused(lambda: call(codecs[codec]), message)


@pytest.mark.parametrize("codec", ["wan", "sd"])
def test_codec_tiling_accepts_numpy_integers(codecs, codec):
    vae = codecs[codec]
    z = mx.random.normal((1, vae.latent_channels, 2, 2), key=mx.random.key(4))
    tiled = vae.from_flow_latent(z, tile_size=np.int64(4), tile_overlap=np.int32(1))
    assert maxerr(tiled, vae.from_flow_latent(z)) <= 1e-5  # one tile covers the latent: the same decode


def test_torch_tensors_and_array_scalars_are_named(flow):
    torch = pytest.importorskip("torch")
    refused(lambda: flow(torch.zeros(1, 2, C, S, S), text()),
            r"x must be an mlx array .*got torch.Tensor of shape \[1, 2, 3, 4, 4\] and dtype torch.float32: "
            r"convert it with mx.array")
    refused(lambda: flow.denoise(latent(), text(), mx.array(1.5)), "window must be an integer >= 1 or None, got "
            r"mlx.core.array of shape \[\] and dtype mlx.core.float32")
    assert maxerr(flow.denoise(latent(), text(), mx.array(2)), flow.denoise(latent(), text(), 2)) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer: prompts, max_length, the SentencePiece model and the sentinels, checked at the entry
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spiece_model() -> bytes:
    pytest.importorskip("transformers")  # tests.test_t5 needs it
    from tests.test_t5 import train_spiece

    return train_spiece()


@pytest.fixture(scope="module")
def tokenizer(spiece_model):
    from starflow_mlx.tokenizer import T5Tokenizer

    return T5Tokenizer(spiece_model, extra_ids=3)


TOKENIZER_CASES = [
    ("lone-surrogate", "\ud800", 8, r"texts\[0\] is not valid Unicode text: surrogates not allowed at character 0"),
    ("surrogate-in-list", ["ok", "x\udfff"], 8, r"texts\[1\] is not valid Unicode text"),
    ("not-a-string", [b"bytes"], 8, r"texts\[0\] must be a prompt \(str\), got bytes"),
    ("max-length-float", "ok", 2.7, "max_length must be an integer >= 1, got float 2.7"),
    ("max-length-huge", "ok", 10**10, "max_length must be <= 4096, got 10000000000"),
    ("max-length-zero", "ok", 0, "max_length must be >= 1, got 0"),
    ("max-length-bool", "ok", True, "max_length must be an integer >= 1, got bool True"),
]


@pytest.mark.parametrize("case, texts, max_length, message", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_tokenizer_arguments_refused(tokenizer, case, texts, max_length, message):
    refused(lambda: tokenizer(texts, max_length), message)


def test_tokenizer_encode_refuses_a_lone_surrogate(tokenizer):
    refused(lambda: tokenizer.encode("a\ud800"), r"text is not valid Unicode text: surrogates not allowed at character 1")


SPIECE_CASES = {
    "empty": (b"", "the spiece bytes: not a SentencePiece model: it is empty"),
    "garbage": (b"\x0a\x05hello", "the spiece bytes: not a SentencePiece model: INTERNAL: "),
}


@pytest.mark.parametrize("data, message", list(SPIECE_CASES.values()), ids=list(SPIECE_CASES))
def test_unusable_sentencepiece_model_refused_silently(data, message, capfd):
    """Refused at load in one line, with nothing from sentencepiece or absl on the process's stderr (fd 2)."""
    from starflow_mlx.checkpoint import CheckpointError
    from starflow_mlx.tokenizer import T5Tokenizer

    capfd.readouterr()
    assert refusal(lambda: T5Tokenizer(data), CheckpointError).startswith(message)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("extra_ids, vocab_size, message", [
    (60000, 203, "200 pieces + 60000 extra ids exceed the model's vocab_size 203"),
    (4, 203, "200 pieces + 4 extra ids exceed the model's vocab_size 203"),
    (3, 150, "200 pieces + 3 extra ids exceed the model's vocab_size 150"),
], ids=["far-over", "one-over", "pieces-over"])
def test_tokenizer_folder_sentinels_must_fit_the_vocabulary(spiece_model, tmp_path, extra_ids, vocab_size, message):
    from starflow_mlx.checkpoint import CheckpointError
    from starflow_mlx.tokenizer import T5Tokenizer

    (tmp_path / "spiece.model").write_bytes(spiece_model)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": vocab_size,
                                                      "tokenizer": {"extra_ids": extra_ids}}))
    text = refusal(lambda: T5Tokenizer.from_folder(tmp_path), CheckpointError)
    assert text == f"{tmp_path / 'spiece.model'}: {message}; is this the tokenizer of this model?"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 203,
                                                      "tokenizer": {"extra_ids": 3}}))
    assert T5Tokenizer.from_folder(tmp_path).vocab_size == 203


# ----------------------------------------------------------------------------------------------------------------
# The loaders: dtype and folder, refused before any file is read
# ----------------------------------------------------------------------------------------------------------------


def _loaders():
    from starflow_mlx.flow import load_flow
    from starflow_mlx.sd_vae import load_sd_vae
    from starflow_mlx.t5 import load_t5
    from starflow_mlx.wan_vae import load_wan_vae

    return {"flow": load_flow, "t5": load_t5, "wan-vae": load_wan_vae, "sd-vae": load_sd_vae}


def _torch_float16():
    return pytest.importorskip("torch").float16


BAD_DTYPES = {
    "numpy-float16": (lambda: np.float16, "<class 'numpy.float16'>"),
    "torch-float16": (_torch_float16, "torch.float16"),
    "mx-float64": (lambda: mx.float64, "mlx.core.float64"),
    "mx-int32": (lambda: mx.int32, "mlx.core.int32"),
    "mx-bool": (lambda: mx.bool_, "mlx.core.bool"),
    "mx-complex64": (lambda: mx.complex64, "mlx.core.complex64"),
    "name-float64": (lambda: "float64", "'float64'"),
    "int": (lambda: 5, "5"),
}


@pytest.mark.parametrize("loader", ["flow", "t5", "wan-vae", "sd-vae"])
@pytest.mark.parametrize("dtype, shown", list(BAD_DTYPES.values()), ids=list(BAD_DTYPES))
def test_loader_dtype_refused(loader, dtype, shown, tmp_path):
    refused(lambda: _loaders()[loader](tmp_path / "never-read", dtype=dtype()),
            rf"dtype must be one of float32, bfloat16, float16 \(as a name or an mx dtype\) or None, got "
            rf"{re.escape(shown)}$")


@pytest.mark.parametrize("loader", ["flow", "t5", "wan-vae", "sd-vae"])
@pytest.mark.parametrize("folder, kind", [(None, "NoneType"), (5, "int"), (b"/tmp", "bytes")], ids=["none", "int", "bytes"])
def test_loader_folder_refused(loader, folder, kind):
    refused(lambda: _loaders()[loader](folder),
            rf"folder must be the path of a converted model folder \(str or os.PathLike\), got {kind}$")


def test_parse_dtype_accepts_names_and_mx_dtypes():
    from starflow_mlx.weights import parse_dtype

    for name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16), ("float16", mx.float16)):
        assert parse_dtype(name) == dtype and parse_dtype(dtype) == dtype
    assert parse_dtype(None, optional=True) is None
    refused(lambda: parse_dtype(None), r"dtype must be one of float32, bfloat16, float16 \(as a name or an mx dtype\), "
                                       r"got None")
