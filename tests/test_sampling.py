"""Jacobi, sliding-window long videos, image/video prefixes, the learnable denoiser and the gradient step:
MLX vs our PyTorch reference, the solvers' own invariants, and the sampler's events (streaming, stopping)."""

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.flow import load_flow
from starflow_mlx.sampler import (
    SEQUENTIAL, ChunkSolved, FrameSampled, Jacobi, Sampled, SamplerOptions, WindowMoved, stream_sample,
)
from tests.helpers import maxerr, official_fixture, to_torch as t

torch = pytest.importorskip("torch")
TOL = 1e-4
TIGHT = Jacobi(block_size=4, threshold=1e-9, max_iter=200)
# Converged by construction: token k of a causal chunk is exact after k + 1 passes, so with no early stop and
# max_iter above the largest chunk (16 tokens) Jacobi *is* the sequential solution, on any machine.
CONVERGED = Jacobi(block_size=4, threshold=0.0, max_iter=17)


def guided(solver=SEQUENTIAL, **kw):
    return SamplerOptions(guidance=3.0, solver=solver, **kw)


def run(model, *args, **kwargs):
    """Sample with the MLX sampler; return (latent, stats)."""
    final = list(stream_sample(model, *args, **kwargs))[-1]
    return final.latent, final.stats


@pytest.fixture(scope="module")
def video(tiny_video):
    ref, config, folder = tiny_video.reference, tiny_video.config, tiny_video.folder
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((1, 9, config.in_channels, config.img_size, config.img_size)).astype(np.float32)
    y = rng.standard_normal((1, config.txt_size, config.txt_dim)).astype(np.float32)
    y_null = rng.standard_normal((1, config.txt_size, config.txt_dim)).astype(np.float32)
    return load_flow(folder), ref, config, noise, y, y_null


def test_converged_jacobi_equals_sequential_and_reference(video):
    model, ref, _, noise, y, y_null = video
    z = noise[:, :3]
    ours, stats = run(model, mx.array(z), mx.array(y), mx.array(y_null), guided(CONVERGED))
    sequential, seq_stats = run(model, mx.array(z), mx.array(y), mx.array(y_null), guided())
    theirs = ref.reverse(t(z), t(y), t(y_null), guided(CONVERGED))
    assert maxerr(ours, sequential) <= TOL
    assert maxerr(ours, theirs) <= TOL
    assert maxerr(sequential, ref.reverse(t(z), t(y), t(y_null), guided())) <= TOL
    # statistics: sequential = one pass per token. Jacobi: chunks of 4 up to and including the one starting at
    # F = 16 (official rule: start <= F), then 4 x 4 = 16, the last one clipped to the clip's end
    S = 3 * 16
    assert seq_stats.deep.passes == seq_stats.deep.tokens == S and set(seq_stats.deep.iterations) == {1}
    sizes = [4, 4, 4, 4, 4, 16, 12]
    assert stats.deep.iterations == [17] * len(sizes)
    assert stats.deep.tokens == 17 * sum(sizes)
    assert stats.blocks[0].chunks == 16 // 4  # shallow blocks: all frames at once (batch B*T), chunks of 4


def test_tight_threshold_is_within_its_bound_of_sequential(video):
    """Early stopping at a relative change of 1e-9 leaves each solver within 1e-3 of the exact solution."""
    model, ref, _, noise, y, y_null = video
    z = noise[:, :3]
    exact, _ = run(model, mx.array(z), mx.array(y), mx.array(y_null), guided())
    ours, _ = run(model, mx.array(z), mx.array(y), mx.array(y_null), guided(TIGHT))
    theirs = ref.reverse(t(z), t(y), t(y_null), guided(TIGHT))
    assert maxerr(ours, exact) <= 1e-3 and maxerr(theirs, exact) <= 1e-3


def test_loose_threshold_is_close_and_cheaper(video):
    model, _, _, noise, y, y_null = video
    z = mx.array(noise[:, :3])
    a, loose = run(model, z, mx.array(y), mx.array(y_null), guided(Jacobi(block_size=4, threshold=1e-3)))
    b, tight = run(model, z, mx.array(y), mx.array(y_null), guided(TIGHT))
    assert loose.deep.passes < tight.deep.passes
    assert maxerr(a, b) < 0.5 and bool(mx.all(mx.isfinite(a)))


def test_sliding_window_long_video(video):
    """A clip 3x the training length (3 latent frames): window 3 frames, overlap 2, re-encoded caches."""
    model, ref, config, noise, y, y_null = video
    jacobi = Jacobi(block_size=4, threshold=1e-6, max_iter=100)
    events = list(stream_sample(model, mx.array(noise), mx.array(y), mx.array(y_null), guided(jacobi, window=3, overlap=2)))
    ours, stats = events[-1].latent, events[-1].stats
    assert ours.shape == noise.shape and noise.shape[1] == 3 * 3
    theirs = ref.reverse(t(noise), t(y), t(y_null), guided(jacobi, window=3, overlap=2))
    assert maxerr(ours, theirs) <= TOL
    assert stats.deep.reencodes == 6 and stats.deep.reencoded_tokens == 6 * 2 * 16
    assert [e.first_frame for e in events if isinstance(e, WindowMoved)] == [1, 2, 3, 4, 5, 6]
    # the first window is solved exactly as without a window; later frames differ (shorter context)
    full, _ = run(model, mx.array(noise), mx.array(y), mx.array(y_null), guided(jacobi))
    assert maxerr(ours[:, :3], full[:, :3]) <= TOL
    assert maxerr(ours[:, 4:], full[:, 4:]) > 1e-3
    # a window covering the clip changes nothing
    same, _ = run(model, mx.array(noise[:, :3]), mx.array(y), mx.array(y_null), guided(jacobi, window=3))
    assert maxerr(same, full[:, :3]) <= TOL


def test_window_defaults_to_the_models_local_attn_window(video, monkeypatch):
    """local_attn_window is the one source of the sliding window; window= overrides it."""
    model, _, _, noise, y, y_null = video
    jacobi = Jacobi(block_size=4, threshold=1e-6, max_iter=100)
    explicit, _ = run(model, mx.array(noise[:, :5]), mx.array(y), mx.array(y_null), guided(jacobi, window=3, overlap=1))
    monkeypatch.setattr(model.config, "local_attn_window", 3)
    default, stats = run(model, mx.array(noise[:, :5]), mx.array(y), mx.array(y_null), guided(jacobi, overlap=1))
    assert maxerr(default, explicit) == 0.0 and stats.deep.reencodes == 1  # frames 0-2, then 2-4
    assert SamplerOptions().sliding_window(model) == (3, 2)  # official overlap 16, capped at window - 1
    wider, stats = run(model, mx.array(noise[:, :5]), mx.array(y), mx.array(y_null), guided(jacobi, window=5))
    assert stats.deep.reencodes == 0 and maxerr(wider, default) > 1e-3


def _prefix_case(video, frames):
    model, ref, config, noise, y, y_null = video
    rng = np.random.default_rng(7)
    given = rng.standard_normal((1, frames, config.in_channels, 4, 4)).astype(np.float32)
    z = noise[:, :4]
    prefix = model.prefill(mx.array(given), mx.array(y), 3.0, mx.array(y_null), frames=4)
    ours, stats = run(model, mx.array(z), mx.array(y), mx.array(y_null), guided(TIGHT), prefix)
    ref_prefix = ref.prefill(t(given), t(y), 3.0, t(y_null), frames=4)
    theirs = ref.reverse(t(z), t(y), t(y_null), guided(TIGHT), ref_prefix)
    return ours, theirs, given, stats, model, z, y, y_null


@pytest.mark.parametrize("frames", [1, 2], ids=["image-to-video", "video-prefix"])
def test_prefix_conditioning(video, frames):
    ours, theirs, given, stats, model, z, y, y_null = _prefix_case(video, frames)
    assert maxerr(ours, theirs) <= TOL
    assert maxerr(ours[:, :frames], given) <= TOL  # the given frames come back out
    # solving starts after the prefix: the first chunk is the one at token frames * 16
    assert sum(stats.deep.iterations) == stats.deep.passes and stats.deep.chunks == (4 if frames == 1 else 2)
    # generation after the prefix really depends on it
    free, _ = run(model, mx.array(z), mx.array(y), mx.array(y_null), guided(TIGHT))
    assert maxerr(ours[:, frames:], free[:, frames:]) > 1e-2


def test_prefix_refuses_other_text_or_guidance(video):
    model, _, config, noise, y, y_null = video
    prefix = model.prefill(mx.array(noise[:, :1]), mx.array(y), 3.0, mx.array(y_null), frames=3)
    z = mx.array(noise[:, :3])
    with pytest.raises(ValueError, match="guidance 2.0 differs from the prefix's guidance 3.0"):
        model.reverse(z, mx.array(y), mx.array(y_null), SamplerOptions(guidance=2.0), prefix)
    with pytest.raises(ValueError, match="differ from the ones the prefix was made with"):
        model.reverse(z, mx.array(y + 1), mx.array(y_null), guided(), prefix)
    assert model.reverse(z, None, None, guided(), prefix).shape == z.shape  # the prefix carries its text


def test_prefix_continuation_equals_full_solve(video):
    """Solving frames 0-3 with frames 0-1 fixed to a previous sample's values reproduces that sample."""
    model, _, _, noise, y, y_null = video
    z = mx.array(noise[:, :4])
    options = SamplerOptions(solver=TIGHT)
    full = model.reverse(z, mx.array(y), None, options)
    prefix = model.prefill(full[:, :2], mx.array(y), frames=4)
    cont = model.reverse(z, mx.array(y), None, options, prefix)
    # a forward round trip of the prefix plus a second inverse: the solver-agreement bar of the issue (1e-3)
    assert maxerr(cont, full) <= 1e-3


def test_learnable_denoiser_matches_reference(video):
    model, ref, config, noise, y, _ = video
    x = noise[:, :3]
    ours = model.denoise(mx.array(x), mx.array(y))
    with torch.no_grad():
        theirs = ref.denoise(t(x), t(y))
        pred = ref.predict_noise(t(x), t(y), True)
    assert maxerr(ours, theirs) <= TOL
    assert maxerr(ours, x - 0.3 * pred.numpy()) <= 1e-5  # x - 0.3 * prediction
    assert maxerr(ours, x) > 0.05


def test_denoiser_chunking_over_time(video, monkeypatch):
    """13 frames, chunks of 12 with the official overlap of denoiser_window frames."""
    model, ref, config, noise, y, _ = video
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 13, config.in_channels, 4, 4)).astype(np.float32)
    ours = model.denoise(mx.array(x), mx.array(y), window=12)
    theirs = ref.denoise(t(x), t(y), window=12)
    assert maxerr(ours, theirs) <= TOL
    whole = model.denoise(mx.array(x), mx.array(y))
    assert maxerr(ours[:, :12], whole[:, :12]) > 0  # frame 12 was denoised in a second, shifted chunk
    monkeypatch.setattr(model.config, "denoiser_window", 12)
    with pytest.raises(ValueError, match="denoiser_window 12 must be >= 0 and smaller than the 12-frame chunk"):
        model.denoise(mx.array(x), mx.array(y), window=12)


def test_gradient_denoise_matches_autograd(tmp_path):
    from starflow_mlx.config import load_official_yaml
    from starflow_mlx.convert.flow import convert_flow
    from tests.reference import StarFlow, load_official_state_dict

    fixture = official_fixture("official-t2i-tiny")
    model = load_flow(convert_flow(fixture.checkpoint, fixture.yaml, tmp_path / "t2i"))
    ref = StarFlow(load_official_yaml(fixture.yaml))
    load_official_state_dict(ref, torch.load(fixture.checkpoint, weights_only=True))
    x, y = fixture.io["x"], fixture.io["y"]
    ours = model.denoise(mx.array(x), mx.array(y))  # no learnable denoiser in T2I: gradient step
    theirs = ref.gradient_denoise(t(x), t(y))
    assert maxerr(ours, theirs) <= TOL
    # the step is sigma^2 * d(total NLL)/dx and it lowers the NLL of the sample
    assert maxerr(ours, x) > 1e-3
    assert float(model.nll(ours, mx.array(y)).mean()) < float(model.nll(mx.array(x), mx.array(y)).mean())


def test_events_report_progress_and_stopping_ends_sampling(video):
    """Chunks of the deep block arrive as events in order; a caller that stops iterating stops the work."""
    model, _, _, noise, y, y_null = video
    seen = []
    stream = stream_sample(model, mx.array(noise[:, :3]), mx.array(y), mx.array(y_null), guided(TIGHT))
    for event in stream:
        assert isinstance(event, ChunkSolved)
        seen.append(event)
        if event.block == 5 and event.stop >= 32:
            break
    stream.close()
    assert [(e.start, e.stop) for e in seen] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 36)]
    assert all(e.total == 48 and e.iterations >= 1 for e in seen)


def test_frames_stream_while_the_deep_block_solves(video):
    """stream_frames: each latent frame is final (shallow blocks done) before the deep block starts the next
    one's last chunk; with the sequential solver the frames equal the batched (official) path exactly."""
    model, _, _, noise, y, y_null = video
    args = (mx.array(noise[:, :3]), mx.array(y), mx.array(y_null))
    events = list(stream_sample(model, *args, guided(stream_frames=True)))
    batched, _ = run(model, *args, guided())
    frames = [(i, e) for i, e in enumerate(events) if isinstance(e, FrameSampled)]
    assert [e.index for _, e in frames] == [0, 1, 2]
    deep_chunks = [i for i, e in enumerate(events) if isinstance(e, ChunkSolved) and e.block == 5]
    assert frames[0][0] < deep_chunks[16] and frames[1][0] < deep_chunks[32]  # frame 0 before frame 1 is solved
    assert isinstance(events[-1], Sampled) and maxerr(events[-1].latent, batched) <= 1e-5
    for index, event in frames:
        assert event.latent.shape == (1, 6, 4, 4) and maxerr(event.latent, batched[:, event.index]) <= 1e-5
    # Jacobi per frame differs from Jacobi over all frames only within its threshold
    jacobi = Jacobi(block_size=4, threshold=1e-8, max_iter=100)
    streamed = list(stream_sample(model, *args, guided(jacobi, stream_frames=True)))[-1].latent
    assert maxerr(streamed, batched) <= 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance": -1.0}, r"SamplerOptions.guidance must be a finite number in \[0, 100.0\], got -1.0"),
        ({"guidance": float("nan")}, "SamplerOptions.guidance must be a finite number in .*, got nan"),
        ({"window": 0}, "window must be >= 1 latent frame, got 0"),
        ({"window": 3, "overlap": 3}, r"overlap \(3\) must be smaller than window \(3\)"),
        ({"overlap": -1}, "overlap must be >= 0 latent frames, got -1"),
        ({"window": 2.5}, "SamplerOptions.window must be an integer, got 2.5"),
        ({"solver": "jacobi"}, "solver must be SEQUENTIAL or a Jacobi"),
    ],
)
def test_sampler_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"block_size": 0}, "Jacobi.block_size must be >= 1, got 0"), ({"max_iter": 1.5}, "Jacobi.max_iter must be an integer"),
     ({"threshold": -1}, "Jacobi.threshold must be >= 0"), ({"previous_frame_init": 1}, "must be true or false")],
)
def test_jacobi_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Jacobi(**kwargs)


def test_sampling_arguments_are_checked(video):
    model, _, _, noise, y, y_null = video
    z = mx.array(noise[:, :3])
    with pytest.raises(ValueError, match="text is required"):
        model.reverse(z, None)
    with pytest.raises(ValueError, match="guidance 3.0 > 0 needs the unconditional text embedding text_null"):
        model.reverse(z, mx.array(y), None, guided())
    with pytest.raises(ValueError, match=r"text must be \(B, L, D\) = \(1, 5, 16\).*got shape \[2, 5, 16\]"):
        model.reverse(z, mx.array(np.concatenate([y, y])))
    with pytest.raises(ValueError, match="text_null must be"):
        model.reverse(z, mx.array(y), mx.array(y_null[:, :2]), guided())
