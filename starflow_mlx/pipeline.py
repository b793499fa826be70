"""One object for a whole pipeline folder: prompt (and image or clip) in, frames and a record out; and the exact
likelihood of a clip under captions.

``Pipeline.from_pretrained(path_or_repo)`` loads the parts of a pipeline folder (``hub.read_pipeline_folder``:
T5 and its tokenizer, the flow, the VAE) once, or with ``low_memory=True`` each part for the stages that use it
(``Pipeline``); ``Pipeline.from_pretrained()`` loads the model shipped in the package (``hub.default_model``).
Generating is a stream of events, a consumer of the sampler's:

- ``pipeline.stream(prompt, task=..., **settings)`` yields ``StageStarted(stage, total)``, the sampler's and
  denoiser's own events (``ChunkSolved``, ``WindowMoved``, ``FrameSampled``, ``Sampled``, ``FramesDenoised``,
  ``Denoised``) in between, ``FramesDecoded(start, stop, total, frames)`` (pixel frames, in order, each once, as
  soon as they are final), ``StageFinished(stage, seconds)``, and lastly ``Generated(result)``. The stages, in
  order: ``text`` (templates and T5), ``prefix`` (image/clip to video only: VAE encode, σ noise, prefill),
  ``sample`` (the flow's inverse), ``denoise`` (when on), ``decode`` (the VAE). When the flow streams frames
  (``Settings.stream_frames``, a video flow whose shallow blocks work within frames), each latent frame is
  denoised (``sampler.FrameDenoiser``) and decoded (the VAE's ``decode_stream``) inside the ``sample`` stage as
  soon as it is final, so the ``denoise`` and ``decode`` stages hold only what is left; a stage's seconds are the
  time spent on its own work wherever it ran. Stopping the iteration (closing the generator) cancels between two
  chunks: nothing else needs cancelling.
- ``text_to_video``, ``text_to_image``, ``image_to_video``, ``video_to_video`` run it to the end, calling
  ``progress(event)`` for each event and ``on_frame(event)`` for each ``FramesDecoded``, and raising
  ``Cancelled`` as soon as ``cancel()`` (a callable or a ``threading.Event``) is true.

``pipeline.plan(task, **settings)`` predicts the peak memory of a generation, stage by stage, without allocating
(``memory.plan``).

Every setting is a field of ``Settings`` (on ``config.Config``: checked on construction, one-line errors naming
the field); ``Pipeline.settings(**overrides)`` fills those not given from the folder's ``PipelineConfig``.
Results: ``Generation.frames`` float32 (num_samples, T, H, W, 3) in [-1, 1] (channels last, ready for
``media.to_uint8``; one frame for an image), the final latent, and ``record`` (a JSON-ready dict of everything
that made the sample). All randomness comes from ``mx.random.key(seed)``: the same settings and seed give the same
frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import mlx.core as mx
import numpy as np

from . import __version__, arguments, hub, media, memory, prompts
from .attention import KV_BITS, KV_GROUP_SIZES, resolve_kv_group_size
from .config import MAX_FRAMES, Config, bounded, shown
from .flow import QUANT_SKIP, StarFlow, load_flow
from .sampler import (
    SEQUENTIAL, Denoised, FrameDenoiser, FrameSampled, Jacobi, SamplerOptions, SamplerStats, Sampled, stream_denoise,
    stream_sample, streams_frames,
)
from .t5 import T5Config, encode_prompts, load_t5
from .tokenizer import T5Tokenizer
from .weights import parse_dtype, quantize_model, read_config, read_model_config

TASKS = ("t2v", "t2i", "i2v", "v2v", "edit", "last", "extend", "inversion")
# The tasks the official trainer conditions by a caption prefix (``prompts.TASK_PREFIXES``, by its own names).
TRAINED_PREFIX = {"edit": "v2v", "last": "last", "extend": "extend"}
# What each task takes: an image, a video, or nothing.
GIVEN_MEDIA = {"i2v": "image", "last": "image", "v2v": "video", "edit": "video", "extend": "video",
               "inversion": "video"}
STAGES = ("text", "prefix", "sample", "denoise", "decode")
# The parts of a pipeline folder each stage computes with (generation's STAGES, and log_likelihood's "encode",
# "text", "likelihood"): with ``low_memory`` a part is loaded when its stage first needs it and dropped when a stage
# ends whose successor in the run does not use it.
STAGE_PARTS = {
    "text": ("text",), "prefix": ("vae", "flow"), "sample": ("flow",), "denoise": ("flow",), "decode": ("vae",),
    "encode": ("vae",), "likelihood": ("flow",),
}
PARTS = ("text", "flow", "vae")
LIKELIHOOD_STAGES = ("encode", "text", "likelihood")
# Parts quantized by from_pretrained(q_bits=...) unless stored quantized, with the layers kept in float.
QUANTIZED_PARTS = {"flow": QUANT_SKIP, "text": ()}
MAX_CACHE_LIMIT = 2**63 - 1  # bytes: mx.set_cache_limit takes a size_t
# Which frames of a given video start the clip: its last (continuation) or its first (re-generate after them).
GIVEN_FROM = ("end", "start")
MAX_SAMPLES = 64
MAX_SEED = 2**63 - 1
# The fields of Settings whose defaults are the pipeline folder's (PipelineConfig fields of the same name).
FOLDER_DEFAULTS = (
    "frames", "fps", "aspect_ratio", "guidance", "jacobi", "jacobi_block_size", "jacobi_threshold",
    "jacobi_max_iter", "denoise", "learnable_denoiser", "denoise_step_size", "target_noise_std", "context_length",
    "attention_temperature",
)


class Cancelled(Exception):
    """Generation stopped because the caller's ``cancel`` said so (between two chunks)."""


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings(Config):
    """Every setting of one generation (official ``sample.py`` flag in brackets). Build it with
    ``Pipeline.settings(**overrides)``: the fields not given are the pipeline folder's defaults.

    ``frames`` and ``fps`` are pixel-space; ``frames`` may pass the training length (a long video, through the
    sliding window, ``context_length`` latent frames carried over [--target_length, --context_length]).
    ``target_noise_std`` None is the flow's own σ. ``attention_temperature`` other than 1 is refused: the
    released models were trained and are sampled at 1, and our attention has no temperature. ``kv_bits`` (8 or 4)
    quantizes the deep block's KV cache, in groups of ``kv_group_size`` (None: 64, or 32 where 64 does not divide
    the flow's head_dim; ``SamplerOptions``).

    ``window``: the deep block's sliding window in latent frames (None: ``Pipeline._window``'s rule); the learnable
    denoiser runs over chunks of the same window. ``stream_frames``: for a video flow whose shallow blocks work
    within frames, denoise and decode each frame while later ones are sampling (``FramesDecoded``); False denoises
    and decodes after sampling, when the deep block's KV cache is gone (a lower peak: ``memory.fit`` turns it off
    for that). Either way the frames are the same: the shallow blocks are inverted frame by frame as the deep
    block finishes each (with Jacobi, each frame's stopping test sees that frame; the official sampler inverts them
    over all frames at once, ``SamplerOptions(stream_frames=False)``, which agrees within the Jacobi threshold). ``decode_tile_size``: the VAE decodes spatial tiles of this many latent pixels
    (None: whole frames).
    """

    frames: int = bounded(min=1, max=MAX_FRAMES)  # --target_length
    fps: int = bounded(min=0, max=240)  # --out_fps
    aspect_ratio: str = bounded(choices=media.ASPECT_RATIOS)  # --aspect_ratio
    guidance: float = bounded(min=0, max=100)  # --cfg
    jacobi: bool  # --jacobi
    jacobi_block_size: int = bounded(min=1, max=65536)  # --jacobi_block_size
    jacobi_threshold: float = bounded(min=0, max=1)  # --jacobi_th
    jacobi_max_iter: int = bounded(min=1, max=1024)  # --jacobi_max_iter
    denoise: bool  # --finetuned_vae none
    learnable_denoiser: bool  # not --disable_learnable_denoiser
    denoise_step_size: float = bounded(above=0, max=100)  # --self_denoising_lr
    target_noise_std: float | None = bounded(above=0, max=100)  # --target_noise_std
    context_length: int = bounded(min=0, max=1024)  # --context_length
    attention_temperature: float = bounded(above=0, max=100)  # --attn_temp
    seed: int = bounded(0, min=0, max=MAX_SEED)  # --seed
    num_samples: int = bounded(1, min=1, max=MAX_SAMPLES)  # --sample_batch_size
    kv_bits: int | None = bounded(None, choices=KV_BITS)
    kv_group_size: int | None = bounded(None, choices=KV_GROUP_SIZES)
    window: int | None = bounded(None, min=1, max=1024)  # --local_attn_window with --target_length
    stream_frames: bool = True
    decode_tile_size: int | None = bounded(None, min=1, max=4096)

    def validate(self) -> None:
        if self.attention_temperature != 1:
            raise ValueError(
                f"attention_temperature {self.attention_temperature} is not supported: only 1 (the released "
                "models' training and sampling value)"
            )

    def solver(self) -> Jacobi:
        if not self.jacobi:
            return SEQUENTIAL
        return Jacobi(block_size=self.jacobi_block_size, threshold=self.jacobi_threshold, max_iter=self.jacobi_max_iter)


# ----------------------------------------------------------------------------------------------------------------
# Events and results
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageStarted:
    """Stage ``stage`` (one of ``STAGES``) begins; ``total``: its unit count where known (latent frames)."""

    stage: str
    total: Optional[int] = None


@dataclass(frozen=True)
class StageFinished:
    stage: str
    seconds: float


@dataclass(frozen=True)
class FramesDecoded:
    """Pixel frames ``start`` .. ``stop - 1`` of ``total`` are final: ``frames``, float32 (num_samples, n, H, W, 3)
    in [-1, 1]. They come in order, each frame once, as soon as the VAE has decoded them: while later frames are
    still sampling when the flow streams frames (``Settings.stream_frames``), else in the decode stage."""

    start: int
    stop: int
    total: int
    frames: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class Generation:
    """``frames``: float32 (num_samples, T, H, W, 3) in [-1, 1], the ``FramesDecoded`` pieces put together;
    ``latent``: the final (denoised) flow latent,
    (num_samples, T', C, h, w) for a video flow, (num_samples, C, h, w) for an image flow; ``sampled``: the
    latent before denoising; ``given``: the noised latent of the
    given frames (i2v, v2v), which ``sampled`` starts with (the shallow blocks of a frame-local flow re-invert those
    frames: exactly, up to float32, with the sequential inverse; within Jacobi's threshold otherwise);
    ``record``: JSON-ready, see ``Pipeline.stream``."""

    frames: np.ndarray
    latent: mx.array
    sampled: mx.array
    given: Optional[mx.array]
    record: dict


@dataclass(frozen=True)
class Generated:
    """The last event of ``Pipeline.stream``."""

    result: Generation


@dataclass(frozen=True)
class Likelihood:
    """``bits_per_dim``: float64 (len(captions),), of ``latent`` (the noisy flow latent scored, one row) under each
    caption; ``record``: JSON-ready."""

    bits_per_dim: np.ndarray
    latent: mx.array
    record: dict


PipelineEvent = Union[StageStarted, StageFinished, Generated, Any]
Media = Union[str, Path, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


class Pipeline:
    """A pipeline folder ready to generate: ``config`` (its ``PipelineConfig``), ``folder`` (``hub.PipelineFolder``),
    ``flow_config`` and ``vae_config`` (read at load: everything that needs only sizes reads these, never a weight),
    ``tokenizer``, and the parts ``text_encoder``, ``flow`` and ``vae`` (a ``codec.LatentCodec``), each loaded from
    the folder on first use, with the load's ``dtype`` and ``q_bits`` quantization.

    ``low_memory`` (True or False) and ``cache_limit`` (bytes, or None for MLX's default) may be changed between
    generations. With ``low_memory`` each part is held only for the stages that use it (``STAGE_PARTS``): T5 for
    ``text``, the flow for ``prefix`` .. ``denoise`` (``sample`` when denoising is off), the VAE for ``prefix`` and
    again for ``decode`` (released in between: sampling is the peak, so it runs without the VAE's weights, at the
    cost of reading them twice for image/video to video), and dropped with ``mx.clear_cache()`` as its last stage
    ends; the peak is then the largest part plus its stage's work instead of every part at once.
    ``cache_limit`` is set with ``mx.set_cache_limit`` while a generation or a likelihood runs and restored after,
    however it ends. One generation at a time per pipeline."""

    def __init__(self, folder: hub.PipelineFolder, tokenizer: T5Tokenizer, model_id: str, *,
                 dtype: mx.Dtype | None = None, quantized_at_load: dict | None = None, low_memory: bool = False,
                 cache_limit: int | None = None):
        self.folder, self.config, self.flow_config = folder, folder.config, folder.flow_config
        # every part's config checked here, whether its weights are read now or when it is first used
        self.text_config = read_model_config(folder.text, T5Config)[0]
        self.vae_config = _read_vae_config(folder)
        self.tokenizer, self.model_id = tokenizer, model_id
        self.dtype, self.quantized_at_load = dtype, quantized_at_load
        self.video = folder.flow_config.is_video
        self._parts: dict[str, Any] = {}
        self._stages_ahead: list[str] | None = None  # of the generation running, for _release_after
        self.low_memory, self.cache_limit = low_memory, cache_limit

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path | None = None, dtype: mx.Dtype | str | None = None, *,
        revision: str | None = None, q_bits: int | None = None, q_group_size: int = 64, low_memory: bool = False,
        cache_limit: int | None = None,
    ) -> "Pipeline":
        """Load a pipeline folder, or a hub repo id of a converted pipeline, or with None the model shipped in the
        package (``hub.resolve_model``); ``dtype`` casts the floating weights of every part (e.g. "float32"; None
        keeps the stored ones). ``q_bits`` (4 or 8) quantizes the flow's and T5's Linear layers as they are
        loaded, as ``convert --q-bits`` would have (the layers the converter keeps in float stay so; parts stored
        quantized are kept as they are). ``low_memory`` reads no weight here (configs and the tokenizer only, every
        config checked as a full load would) and loads each part for the stages that use it; ``cache_limit``
        bounds MLX's buffer cache during generation (see the class)."""
        if q_bits is not None:
            _check_choice("q_bits", q_bits, (4, 8))
        _check_choice("q_group_size", q_group_size, (32, 64, 128))
        dtype = parse_dtype(dtype, optional=True)
        arguments.flag("low_memory", low_memory)
        _check_cache_limit(cache_limit)
        root = hub.resolve_model(path_or_repo, revision=revision)
        folder = hub.read_pipeline_folder(root)
        quantized = None if q_bits is None else {"bits": q_bits, "group_size": q_group_size}
        model_id = hub.DEFAULT_MODEL_ID if path_or_repo is None else str(path_or_repo)
        pipeline = cls(folder, T5Tokenizer.from_folder(folder.text), model_id, dtype=dtype,
                       quantized_at_load=quantized, low_memory=low_memory, cache_limit=cache_limit)
        if not pipeline.low_memory:
            for part in PARTS:
                pipeline._part(part)
        return pipeline

    # ---- the parts, loaded when used ----
    @property
    def text_encoder(self):
        return self._part("text")

    @property
    def flow(self) -> StarFlow:
        return self._part("flow")

    @property
    def vae(self):
        return self._part("vae")

    @property
    def loaded_parts(self) -> tuple[str, ...]:
        """The parts whose weights are in memory now (of ``PARTS``)."""
        return tuple(part for part in PARTS if part in self._parts)

    @property
    def low_memory(self) -> bool:
        return self._low_memory

    @low_memory.setter
    def low_memory(self, value: bool) -> None:
        self._low_memory = arguments.flag("low_memory", value)
        if self._low_memory:
            self._drop(*PARTS)

    @property
    def cache_limit(self) -> int | None:
        return self._cache_limit

    @cache_limit.setter
    def cache_limit(self, value: int | None) -> None:
        self._cache_limit = _check_cache_limit(value)

    def _part(self, name: str):
        if name not in self._parts:
            self._parts[name] = self._load(name)
        return self._parts[name]

    def _load(self, name: str):
        """Part ``name`` from the folder, cast to ``dtype`` and quantized as ``from_pretrained`` was asked."""
        path = getattr(self.folder, name)
        if name == "vae":
            model = _load_vae(self.folder, self.dtype)
        else:
            model = (load_t5 if name == "text" else load_flow)(path, self.dtype)
        if self.quantized_at_load and name in QUANTIZED_PARTS and read_config(path).get("quantization") is None:
            bits, group_size = self.quantized_at_load["bits"], self.quantized_at_load["group_size"]
            quantize_model(model, bits, group_size, skip=QUANTIZED_PARTS[name])
        return model

    def _drop(self, *names: str) -> None:
        """Forget the parts ``names`` (loaded again when used) and give their memory back."""
        dropped = [self._parts.pop(name) for name in names if name in self._parts]
        if dropped:
            del dropped
            mx.clear_cache()

    def _release_after(self, stage: str) -> None:
        """The end of ``stage``: with ``low_memory``, drop the parts it used that the next stage of this run does
        not use (outside a run: every part it used). Called by the stages themselves; idempotent."""
        ahead = self._stages_ahead or []
        if stage in ahead:
            del ahead[: ahead.index(stage) + 1]
        if self.low_memory:
            kept = STAGE_PARTS[ahead[0]] if ahead else ()
            self._drop(*(part for part in STAGE_PARTS[stage] if part not in kept))

    @contextlib.contextmanager
    def _running(self, stages: list[str]):
        """One generation or likelihood running ``stages``: MLX's cache limit set to ``cache_limit`` and restored,
        and, with ``low_memory``, nothing left loaded however it ends (finished, failed or closed early)."""
        previous = None if self.cache_limit is None else mx.set_cache_limit(self.cache_limit)
        self._stages_ahead = list(stages)
        try:
            yield
        finally:
            self._stages_ahead = None
            if self.low_memory:
                self._drop(*PARTS)
            if previous is not None:
                mx.set_cache_limit(previous)

    def _run_stages(self, events: Iterator[PipelineEvent], stages: list[str]) -> Iterator[PipelineEvent]:
        """``events`` of a generation that runs ``stages``, ``_running`` from its first event to its end."""
        with self._running(stages):
            yield from events

    # ---- settings ----
    def settings(self, **overrides) -> Settings:
        """The folder's defaults with ``overrides`` (``Settings`` field names); every value is checked, and the
        ones this pipeline cannot make (an aspect ratio it was not trained for, a frame count the VAE cannot
        decode, a denoiser it does not have) are refused naming the field."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Settings)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(Settings))
            raise ValueError(f"unknown setting {unknown[0]!r}; settings are {known}")
        defaults = {name: getattr(self.config, name) for name in FOLDER_DEFAULTS}
        settings = Settings(**{**defaults, **overrides})
        self._check_fits(settings)
        return settings

    def _check_fits(self, s: Settings) -> None:
        if s.aspect_ratio not in self.config.aspect_ratios:
            raise ValueError(f"aspect_ratio {s.aspect_ratio!r} is not one this pipeline was trained for: "
                             f"{', '.join(self.config.aspect_ratios)}")
        if not self.video and s.frames != 1:
            raise ValueError(f"frames {s.frames}: an image pipeline makes 1 frame")
        step = self.vae_config.temporal_factor
        if (s.frames - 1) % step:
            below = s.frames - (s.frames - 1) % step
            raise ValueError(f"frames {s.frames} cannot be decoded: the VAE makes 1 + {step}k frames "
                             f"(e.g. {below} or {below + step})")
        if self.video and s.frames > 1 and s.fps < 1:
            raise ValueError(f"fps {s.fps}: a video needs fps >= 1")
        resolve_kv_group_size(s.kv_bits, s.kv_group_size, self.flow_config.head_dim, "Settings.")
        if s.denoise and s.learnable_denoiser and not self.flow_config.learnable_self_denoiser:
            raise ValueError("learnable_denoiser is true but this flow has no learnable denoiser; set "
                             "learnable_denoiser=False for the gradient step")

    def noise_std(self, settings: Settings) -> float:
        return settings.target_noise_std or self.flow_config.noise_std

    def pixel_size(self, settings: Settings) -> tuple[int, int]:
        """(H, W) of a sample: the aspect-ratio bucket of the flow's training area (``dataset``'s sizes)."""
        factor, flow = self.vae_config.spatial_factor, self.flow_config
        ratio = settings.aspect_ratio if flow.mix_aspect else None
        return media.bucket_size(ratio, flow.img_size * factor, factor * flow.patch_size)

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.vae_config.temporal_factor + 1

    def template(self, caption: str, settings: Settings, task: str | None = None) -> str:
        """``caption`` through the official templates the flow was trained with (fps, noise level, ratio), after
        the task's training prefix (``(v2v) `` for edit, ``(last) ``, ``(extend) ``) where it has one."""
        flow = self.flow_config
        if task in TRAINED_PREFIX:
            caption = prompts.add_task_prefix(caption, TRAINED_PREFIX[task])
        return prompts.format_prompt(
            caption,
            fps=settings.fps if flow.fps_cond else None,
            noise_std=self.noise_std(settings) if flow.cond_noise_level else None,
            aspect_ratio=settings.aspect_ratio if flow.mix_aspect else None,
        )

    # ---- one-call forms ----
    def text_to_video(self, prompt: str, *, progress=None, cancel=None, on_frame=None, **settings) -> Generation:
        return _run(self.stream(prompt, "t2v", **settings), progress, cancel, on_frame)

    def text_to_image(self, prompt: str, *, progress=None, cancel=None, on_frame=None, **settings) -> Generation:
        """One image: STARFlow (a T2I pipeline) or one frame of STARFlow-V (fps 0: the "An image:" template)."""
        return _run(self.stream(prompt, "t2i", **settings), progress, cancel, on_frame)

    def image_to_video(self, prompt: str, image: Media, *, progress=None, cancel=None, on_frame=None,
                       **settings) -> Generation:
        """A clip whose first frame is ``image`` (a PNG/JPEG/WebP path, or (H, W, 3) uint8 / float in [-1, 1]),
        resized and centre-cropped to the bucket; its latent is the final latent's first frame."""
        return _run(self.stream(prompt, "i2v", image=image, **settings), progress, cancel, on_frame)

    def video_to_video(
        self, prompt: str, video: Media, *, given_frames: int | None = None, given_from: str = "end", progress=None,
        cancel=None, on_frame=None, **settings
    ) -> Generation:
        """``video`` continued: its last ``given_frames`` frames (1 + 4k for the Wan VAE; default: the longest
        such count up to half of ``frames``) start the clip, the rest is sampled after them; with ``given_from``
        "start", its first frames are kept and the rest of it is generated anew. ``video``: a path, or (T, H, W, 3)
        frames (uint8, or float in [-1, 1]). The given frames are encoded as a clip of their own, which the models
        were not trained on mid-scene; ``extend`` is the trained continuation."""
        events = self.stream(prompt, "v2v", video=video, given_frames=given_frames, given_from=given_from, **settings)
        return _run(events, progress, cancel, on_frame)

    def edit(self, prompt: str, video: Media, *, progress=None, cancel=None, on_frame=None, **settings) -> Generation:
        """``video`` edited as ``prompt`` says (the official ``(v2v) `` training task): its first ``frames`` frames
        are encoded as the prefix, and the clip sampled after them under ``"(v2v) " + prompt`` is the result
        (``frames`` frames; the source's are not in it). The prompt describes the clip wanted (on the shipped
        model: "a blue square moving right" for a red one)."""
        return _run(self.stream(prompt, "edit", video=video, **settings), progress, cancel, on_frame)

    def last_frame(self, prompt: str, image: Media, *, progress=None, cancel=None, on_frame=None,
                   **settings) -> Generation:
        """A clip that leads into ``image`` (the official ``(last) `` training task): the image, encoded alone, is
        the prefix, and the ``frames`` frames sampled after it under ``"(last) " + prompt`` are the result; the
        image is the frame right after the clip's last one (training paired the clip x[:-4] with the frame
        x[-4])."""
        return _run(self.stream(prompt, "last", image=image, **settings), progress, cancel, on_frame)

    def extend(self, prompt: str, video: Media, *, given_frames: int | None = None, progress=None, cancel=None,
               on_frame=None, **settings) -> Generation:
        """``video`` continued mid-scene (the official ``(extend) `` training task): its last ``given_frames``
        frames (1 + 4k, default as ``video_to_video``) are encoded as one clip, the flow continues its latent
        frames *after the first* (the image latent, which training dropped) under ``"(extend) " + prompt``, and
        the result is the whole clip, ``frames`` frames with the given ones first (decoded back from their latent);
        past the training length through the sliding window."""
        events = self.stream(prompt, "extend", video=video, given_frames=given_frames, **settings)
        return _run(events, progress, cancel, on_frame)

    def inversion_edit(self, prompt: str, video: Media, *, source_prompt: str, strength: float = 0.0,
                       progress=None, cancel=None, on_frame=None, **settings) -> Generation:
        """``video`` edited by exact inversion: its first ``frames`` frames are encoded (VAE posterior sample, σ
        noise), the flow's forward pass maps them to its noise under ``source_prompt`` (with the guidance the
        sampler uses, so the two are exact inverses), ``strength`` mixes in fresh noise (``sqrt(1 - s²)·z + s·ε``;
        0 keeps the source's noise, 1 is a new sample of ``prompt``), and the sampler maps it back under
        ``prompt``. What the captions share is kept; the result has ``frames`` frames. The round trip (``prompt ==
        source_prompt``, strength 0) gives back the noised source latent to float precision with the sequential
        inverse: inversion uses it unless ``jacobi`` is set explicitly (Jacobi stops within its threshold)."""
        events = self.stream(prompt, "inversion", video=video, source_prompt=source_prompt, strength=strength,
                             **settings)
        return _run(events, progress, cancel, on_frame)

    # ---- the stream ----
    def stream(
        self, prompt: str, task: str = "t2v", *, image: Media | None = None, video: Media | None = None,
        given_frames: int | None = None, given_from: str = "end", source_prompt: str | None = None,
        strength: float | None = None, **overrides,
    ) -> Iterator[PipelineEvent]:
        """Generate as events (module docstring). ``task``: "t2v", "t2i", "i2v" (needs ``image``), "v2v" (needs
        ``video``), "edit", "last" (``image``), "extend", "inversion" (``video``, ``source_prompt``, ``strength``;
        see the one-call forms); ``overrides``: ``Settings`` fields. Everything is checked before the first event.

        The record: task, prompt (raw, templated, unconditional), settings (every field), size (H, W), latent
        shape, model (``model_record``), timings per stage (seconds), sampler statistics per block, bits/dim of each
        sampled latent under its prompt, version; for the conditioned tasks the given frames and the latent frames
        of the sampled sequence that were given (``prefix_frames``), for inversion the source prompt and
        strength."""
        task = _check_task(task)
        prompt = arguments.prompt("prompt", prompt)
        settings = self.settings(**_task_overrides(task, overrides))
        if task == "t2i" and settings.frames != 1:
            raise ValueError(f"frames {settings.frames}: text_to_image makes 1 frame")
        self.check_prompt_length(self.template(prompt, settings, task))
        source = self._inversion_arguments(task, source_prompt, strength, settings)
        condition = self._condition(task, image, video, given_frames, given_from, settings)
        if task == "inversion":
            self._check_inversion_length(settings)
        events = self._events(task, prompt, settings, condition, given_from if task == "v2v" else None, source)
        skipped = {"prefix"} if condition is None else set()
        skipped |= set() if settings.denoise else {"denoise"}
        return self._run_stages(events, [stage for stage in STAGES if stage not in skipped])

    def _inversion_arguments(self, task, source_prompt, strength, settings: Settings) -> Optional[tuple]:
        """(source prompt, strength) of an inversion, checked; None for the other tasks, which take neither."""
        if task != "inversion":
            for name, value in (("source_prompt", source_prompt), ("strength", strength)):
                if value is not None:
                    raise ValueError(f"{name} is an argument of inversion editing, not of task {task}")
            return None
        if source_prompt is None:
            raise ValueError("inversion editing needs source_prompt: the caption of the given clip")
        source_prompt = arguments.prompt("source_prompt", source_prompt)
        self.check_prompt_length(self.template(source_prompt, settings), "source_prompt")
        strength = arguments.finite_number("strength", 0.0 if strength is None else strength, minimum=0.0, maximum=1.0)
        return source_prompt, strength

    def _condition(self, task, image, video, given_frames, given_from, settings) -> Optional[np.ndarray]:
        """The given image or frames as pixels (T, 3, H, W) in [-1, 1]: i2v / last an image; v2v / extend the
        clip's given frames; edit / inversion its first ``frames`` frames. None for t2v / t2i."""
        wanted = GIVEN_MEDIA.get(task)
        for name, value in (("image", image), ("video", video)):
            if value is not None and name != wanted:
                raise ValueError(f"task {task} takes {'no image or video' if wanted is None else 'no ' + name}")
        if task not in ("v2v", "extend") and given_frames is not None:
            raise ValueError(f"given_frames is an argument of video_to_video and extend, not of task {task}")
        if task != "v2v" and given_from != "end":
            raise ValueError(f"given_from is an argument of video_to_video, not of task {task}")
        if wanted is None:
            return None
        if not self.video:
            raise ValueError(f"task {task} needs a video pipeline; this one makes images")
        if (image if wanted == "image" else video) is None:
            raise ValueError(f"task {task} needs {'an image' if wanted == 'image' else 'a video'}")
        size = self.pixel_size(settings)
        if wanted == "image":
            return _read_image(image, size)[None]
        if task in ("edit", "inversion"):
            return _read_clip(video, size, settings.frames, settings.fps, from_end=False)
        if given_from not in GIVEN_FROM:
            raise ValueError(f"given_from must be one of {', '.join(GIVEN_FROM)}, got {given_from!r}")
        if given_frames is not None:
            given_frames = arguments.integer("given_frames", given_frames, 1)
        given = memory.given_frames(task, given_frames, settings.frames, self.vae_config.temporal_factor)
        return _read_clip(video, size, given, settings.fps, from_end=given_from == "end")

    def _events(self, task, prompt, settings: Settings, condition, given_from, source) -> Iterator[PipelineEvent]:
        keys = mx.random.split(mx.random.key(settings.seed), 3)  # noise, conditioning σ noise, VAE posterior
        timings: dict[str, float] = {}
        B, guidance = settings.num_samples, settings.guidance

        start = time.perf_counter()
        yield StageStarted("text", (2 if guidance > 0 else 1) + (source is not None))
        templated, unconditional = self.template(prompt, settings, task), self.template("", settings)
        text = self._encode([templated] * B)
        text_null = self._encode([unconditional]) if guidance > 0 else None
        source_text = None if source is None else self._encode([self.template(source[0], settings)] * B)
        yield _end("text", start, timings)
        self._release_after("text")

        noise = mx.random.normal(self._latent_shape(settings, task), key=keys[0])
        plan = _TaskLatents()
        if condition is not None:
            start = time.perf_counter()
            yield StageStarted("prefix", 1)
            if source is None:
                plan = self._prefill(task, condition, settings, text, text_null, keys[1:], noise.shape[1])
            else:
                plan.given = self._noised_latent(condition, settings, keys[1:])
                noise = self._to_noise(plan.given, source_text, text_null, settings, source[1], noise)
            yield _end("prefix", start, timings)
            self._release_after("prefix")
        prefix = plan.prefix

        latent_frames = noise.shape[1] if noise.ndim == 5 else 1
        yield StageStarted("sample", latent_frames)
        # The shallow blocks are always inverted frame by frame (as each frame's deep block is done): their caches
        # hold one frame instead of the clip, and ``stream_frames`` then only says when the frames are denoised and
        # decoded, never what they are.
        options = SamplerOptions(guidance=guidance, solver=settings.solver(), stream_frames=True,
                                 kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size,
                                 **self._window(noise, settings, task))
        streamed = settings.stream_frames and streams_frames(self.flow, options, noise)
        output = _FrameOutput(self, settings, text, noise, streamed, timings, task, plan.skip, plan.lead)
        stats: SamplerStats | None = None
        sampled = None
        events = stream_sample(self.flow, noise, None if prefix else text, None if prefix else text_null, options,
                               prefix)
        for event in _timed(events, "sample", timings):
            if isinstance(event, Sampled):
                sampled, stats = event.latent, event.stats
            yield event
            if isinstance(event, FrameSampled):
                yield from output.sampled(event.latent[:, None])
        media.check_sample(np.array(sampled), "sample (the flow's inverse)")
        prefix = plan.prefix = None  # its KV caches: sampling is done
        bits = self._bits_per_dim(sampled, text, settings)  # here: the flow may be released after its last stage
        mx.eval(bits)
        yield StageFinished("sample", timings["sample"])
        self._release_after("sample")

        latent = sampled
        if settings.denoise:
            yield StageStarted("denoise", latent_frames)
            for event in output.denoise(sampled):
                yield event
                if isinstance(event, Denoised):
                    latent = event.latent
            media.check_sample(np.array(latent), "denoise")
            yield StageFinished("denoise", timings["denoise"])
            self._release_after("denoise")

        yield StageStarted("decode", B)
        yield from output.decode(latent)
        frames = output.frames()
        media.check_sample(frames, "decode", (-1.0, 1.0))
        yield StageFinished("decode", timings["decode"])
        self._release_after("decode")

        record = {
            "task": task,
            "prompt": prompt,
            "prompt_templated": templated,
            "prompt_unconditional": unconditional if guidance > 0 else None,
            "settings": dataclasses.asdict(settings),
            "noise_std": self.noise_std(settings),
            "size": list(self.pixel_size(settings)),
            "frames": int(frames.shape[1]),
            "latent_shape": list(latent.shape),
            "given_frames": None if condition is None else int(condition.shape[0]),
            "given_from": given_from,
            "prefix_frames": plan.prefix_frames,
            "model": self.model_record(),
            "timings": timings,
            "sampler": _stats_record(stats),
            "bits_per_dim": [float(b) for b in np.array(bits)],
            "version": __version__,
        }
        if source is not None:
            record.update(source_prompt=source[0], source_prompt_templated=self.template(source[0], settings),
                          strength=source[1])
        latent = output.output_latent(latent)
        yield Generated(Generation(np.clip(frames, -1.0, 1.0), latent, sampled, plan.given, record))

    def check_prompt_length(self, templated: str, name: str = "prompt") -> None:
        """The templated prompt and its end token must fit the flow's text window (``txt_size`` tokens): the
        official code cuts a longer one silently, dropping the end of the caption the user wrote."""
        tokens, window = len(self.tokenizer.encode(templated)) + 1, self.flow_config.txt_size
        if tokens > window:
            raise ValueError(f"{name} is too long: {tokens} tokens with the prompt template, and the model reads "
                             f"{window}; shorten it")

    def _encode(self, texts: list[str]) -> mx.array:
        """T5 embeddings (len(texts), txt_size, txt_dim), evaluated: a lazy result would keep T5's weights alive
        through its graph after the text stage drops them."""
        encoded = encode_prompts(self.text_encoder, self.tokenizer, texts, self.flow_config.txt_size)
        mx.eval(encoded)
        return encoded

    def _latent_shape(self, settings: Settings, task: str = "t2v") -> tuple[int, ...]:
        """The sampled sequence: the output clip's latent frames, after the prefix frames of edit (the source's)
        and last (the image's), without the first of extend (kept out of the flow, as training dropped it)."""
        height, width = self.pixel_size(settings)
        factor, channels = self.vae_config.spatial_factor, self.flow_config.in_channels
        grid = (channels, height // factor, width // factor)
        if not self.video:
            return (settings.num_samples, *grid)
        return (settings.num_samples, memory.sampled_frames(task, self.latent_frames(settings.frames)), *grid)

    def _trained_frames(self, task: str) -> int:
        return memory.trained_frames(task, self.latent_frames(self.config.frames))

    def _window(self, noise: mx.array, settings: Settings, task: str = "t2v") -> dict:
        """The deep block's sliding window: ``settings.window``, else the model's own, or for a sequence longer than
        the task's training one of a model without a window, that length (``context_length`` frames carried
        over): an edit's target sees its whole source as in training."""
        if noise.ndim != 5:
            return {}
        window = settings.window
        if window is None:
            window = self.flow_config.local_attn_window
            trained = self._trained_frames(task)
            if window is None and noise.shape[1] > trained:
                window = trained
            if window is None or window < 2:
                return {}
        return {"window": window, "overlap": min(settings.context_length, window - 1)}

    def _bits_per_dim(self, sampled: mx.array, text: mx.array, settings: Settings) -> mx.array:
        """The record's bits/dim of the sample under its prompt: the chunked forward, its deep block through a KV
        cache at the sampler's ``kv_bits`` (a float cache of the whole clip would be the run's peak: 13 GB for the
        7B's 5 s clip against 3.7 GB at 4 bits), so with ``kv_bits`` the score carries the cache's rounding."""
        if settings.kv_bits is None:
            return self.flow(sampled, text).bits_per_dim()
        frames = sampled.shape[1] if sampled.ndim == 5 else 1
        caches = self.flow.make_cache(frames, *sampled.shape[-2:], text.shape[1], None, settings.kv_bits,
                                      settings.kv_group_size)
        return self.flow(sampled, text, caches=caches).bits_per_dim()

    def _denoise_window(self, noise: mx.array, settings: Settings, task: str = "t2v") -> int | None:
        """The learnable denoiser's chunk: the deep block's window (memory stays flat over a long clip), widened to
        ``denoiser_window`` + 1 frames where it is shorter, since a chunk must move forward past the frames it
        shares with the previous one (the official loop would never end there); None: the denoiser's default."""
        window = self._window(noise, settings, task).get("window")
        shared = self.flow_config.denoiser_window
        if window is not None and shared is not None and window <= shared:
            return shared + 1
        return window

    def _noised_latent(self, pixels: np.ndarray, settings: Settings, keys, drop_first: bool = False):
        """The given frames (T, 3, H, W) encoded to the flow latent (posterior sample) with the model's σ noise
        (official ``prepare_input_image``: ``add_noise``), one row per sample; with ``drop_first``, (that latent
        without its first frame, the first frame's clean posterior sample)."""
        latent = self.vae.to_flow_latent(mx.array(pixels)[None], key=keys[1])
        first = None
        if drop_first:
            first, latent = latent[:, :1], latent[:, 1:]
        latent = latent + self.noise_std(settings) * mx.random.normal(latent.shape, key=keys[0])
        rows = lambda x: mx.broadcast_to(x, (settings.num_samples, *x.shape[1:]))  # noqa: E731
        return (rows(latent), rows(first)) if drop_first else rows(latent)

    def _prefill(self, task: str, pixels: np.ndarray, settings: Settings, text, text_null, keys,
                 frames: int) -> "_TaskLatents":
        """The given frames as the prefix of every sample (the context pass): for extend without their first latent
        frame, which goes straight to the decoder (``lead``); edit and last leave their prefix out of the output
        (``skip``)."""
        lead = None
        if task == "extend":
            given, lead = self._noised_latent(pixels, settings, keys, drop_first=True)
        else:
            given = self._noised_latent(pixels, settings, keys)
        prefix = self.flow.prefill(given, text, settings.guidance, text_null, frames=frames,
                                   kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size)
        frames = given.shape[1] if given.ndim == 5 else 1
        return _TaskLatents(given, prefix, frames if task in ("edit", "last") else 0, lead, frames)

    def _check_inversion_length(self, settings: Settings):
        """Inversion maps the source through one forward pass, which is the sampler's exact inverse only where the
        deep block sees the whole clip: a clip that needs the sliding window is refused."""
        shape = self._latent_shape(settings, "inversion")
        # a window that holds the whole clip never moves (the sampler is then the whole-clip inverse, as the
        # planner's ``memory._window`` counts it): only a shorter one is refused. ``_window`` returns a given
        # ``settings.window`` whatever its size, and refusing any window refused exact inversions with a message
        # asking for the frame count they already had.
        window = self._window(mx.zeros(shape), settings, "inversion").get("window")
        if window is not None and window < shape[1]:
            if settings.window is not None:
                raise ValueError(f"window {settings.window}: inversion editing of {shape[1]} latent frames needs the "
                                 f"deep block to see the whole clip (the forward pass does not invert a sliding "
                                 f"window exactly); use window {shape[1]} or more, or None")
            raise ValueError(f"frames {settings.frames}: inversion editing of {shape[1]} latent frames needs the deep "
                             f"block's sliding window, which the forward pass does not invert exactly; use at most "
                             f"{self._trained_frames('inversion')} latent frames ({self.config.frames} frames)")

    def _to_noise(self, given: mx.array, source_text: mx.array, text_null, settings: Settings, strength: float,
                  fresh: mx.array) -> mx.array:
        """Inversion: the flow's forward pass maps the noised source latent to its noise under the source caption,
        guided as the sampler will be (rows [cond; uncond] of the same latent: the deep block's guided affine is then
        the one the guided inverse applies), and ``strength`` of ``fresh`` noise is mixed in."""
        guidance = settings.guidance
        rows, text = given, source_text
        if guidance > 0:
            rows, text = mx.concatenate([given, given]), self.flow.guided_text(source_text, text_null, guidance)
        z = self.flow(rows, text, guidance).z[: given.shape[0]]
        if strength > 0:
            z = math.sqrt(1 - strength**2) * z + strength * fresh
        mx.eval(z)
        return z

    def _denoise(self, sampled: mx.array, text: mx.array, settings: Settings, window: int | None):
        """The whole latent's denoising events, the last one ``Denoised``."""
        if settings.learnable_denoiser:
            yield from stream_denoise(self.flow, sampled, text, window)
            return
        # the gradient step x - lr * σ² * grad NLL (official self-denoising of T2I, --self_denoising_lr)
        stepped = self.flow.gradient_denoise(sampled, text, self.noise_std(settings))
        latent = sampled + settings.denoise_step_size * (stepped - sampled)
        mx.eval(latent)
        yield Denoised(latent)

    def model_record(self) -> dict:
        """Where the weights came from: the model argument (``hub.DEFAULT_MODEL_ID`` for the shipped model), the
        folder, its provenance's name and version (``hub.model_name``), and each part's kind, dtype, quantization
        and source files' sha256 (``hub.part_records``)."""
        folder = self.folder
        record = {"id": self.model_id, "folder": str(folder.root), **hub.model_name(folder),
                  "parts": hub.part_records(folder)}
        if self.quantized_at_load:
            record["quantized_at_load"] = dict(self.quantized_at_load)
        return record

    # ---- likelihood ----
    def log_likelihood(
        self, media_or_frames: Media, captions: list[str] | str, *, seed: int = 0, **overrides
    ) -> Likelihood:
        """Bits/dim of a clip or image under each caption: the media resized and centre-cropped to the bucket
        (``aspect_ratio``), encoded by the VAE (posterior sample), the model's σ noise added (``target_noise_std``
        or the flow's), both from ``mx.random.key(seed)``; then the flow's exact NLL, all captions in one batch.
        This is the likelihood of the *noisy* latent, the density the flow was trained on, not of the clean one.

        ``media_or_frames``: an image or video path, or frames (T, H, W, 3) / (H, W, 3), uint8 or float in
        [-1, 1]; a video is read for ``frames`` frames at ``fps`` (the settings'). ``overrides``: ``Settings``."""
        captions = [captions] if isinstance(captions, str) else captions
        captions = arguments.prompts(captions)
        settings = self.settings(seed=seed, **overrides)
        templated = [self.template(c, settings) for c in captions]
        for i, t in enumerate(templated):
            self.check_prompt_length(t, f"captions[{i}]")
        timings: dict[str, float] = {}
        with self._running(LIKELIHOOD_STAGES):
            start = time.perf_counter()
            pixels = self._scored_pixels(media_or_frames, settings)
            keys = mx.random.split(mx.random.key(settings.seed), 2)
            latent = self.vae.to_flow_latent(mx.array(pixels)[None], key=keys[1])
            if not self.video:
                latent = latent[:, 0]
            latent = latent + self.noise_std(settings) * mx.random.normal(latent.shape, key=keys[0])
            mx.eval(latent)
            _end("encode", start, timings)
            self._release_after("encode")
            start = time.perf_counter()
            text = self._encode(templated)
            _end("text", start, timings)
            self._release_after("text")
            start = time.perf_counter()
            rows = mx.broadcast_to(latent, (len(captions), *latent.shape[1:]))
            bits = np.array(self.flow(rows, text).bits_per_dim(), dtype=np.float64)
            _end("likelihood", start, timings)
            self._release_after("likelihood")
        if not np.all(np.isfinite(bits)):
            raise ValueError(f"likelihood: the bits/dim hold NaN/inf ({bits.tolist()}); {media.PRECISION_FIX}")
        record = {
            "captions": captions, "prompts_templated": templated, "bits_per_dim": bits.tolist(),
            "settings": dataclasses.asdict(settings), "noise_std": self.noise_std(settings),
            "size": list(self.pixel_size(settings)), "frames": int(pixels.shape[0]),
            "latent_shape": list(latent.shape), "model": self.model_record(), "timings": timings,
            "version": __version__, "note": "bits/dim of the VAE latent with the model's noise added (seeded)",
        }
        return Likelihood(bits, latent, record)

    def _scored_pixels(self, source: Media, settings: Settings) -> np.ndarray:
        size = self.pixel_size(settings)
        if not self.video:
            return _read_image(source, size)[None]
        if isinstance(source, np.ndarray) and source.ndim == 3:
            return _read_image(source, size)[None]
        return _read_clip(source, size, settings.frames, settings.fps, from_end=False)

    # ---- memory ----
    def plan(self, task: str = "t2v", *, backend: str | None = None, given_frames: int | None = None,
             **overrides) -> "memory.MemoryPlan":
        """The predicted peak memory of generating with these settings, stage by stage (``memory.plan``), for the
        weights as this pipeline loads them (``dtype``, ``quantized_at_load``, the folder's stored dtypes and
        quantization) and ``self.low_memory``; ``overrides``: ``Settings`` fields; ``backend``: "cpu" or "gpu"
        (default: this machine's). Reads no weight (the folder's config files only) and allocates nothing."""
        task = _check_task(task)
        overrides = _task_overrides(task, overrides)
        settings = self.settings(**overrides)
        quantized = self.quantized_at_load or {}
        request = memory.request_from_settings(
            task, dataclasses.asdict(settings), given_frames=given_frames,
            dtype=None if self.dtype is None else _dtype_name(self.dtype), q_bits=quantized.get("bits"),
            q_group_size=quantized.get("group_size", 64), low_memory=self.low_memory,
            backend=backend or memory.default_backend(),
        )
        return memory.plan(memory.from_folder(self.folder.root), request)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _read_vae_config(folder: hub.PipelineFolder):
    if folder.vae_kind == "wan-vae":
        from .wan_vae import WanVAEConfig

        return read_model_config(folder.vae, WanVAEConfig)[0]
    from .sd_vae import SDVAEConfig

    return read_model_config(folder.vae, SDVAEConfig)[0]


def _load_vae(folder: hub.PipelineFolder, dtype):
    if folder.vae_kind == "wan-vae":
        from .wan_vae import load_wan_vae

        return load_wan_vae(folder.vae, dtype)
    from .sd_vae import load_sd_vae

    return load_sd_vae(folder.vae, dtype)


def _check_choice(name: str, value, choices: tuple[int, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {shown(value)}")


def _check_cache_limit(value) -> int | None:
    return arguments.integer("cache_limit (bytes)", value, 0, optional=True, maximum=MAX_CACHE_LIMIT)


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")


def _check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r:.40}")
    return task


def _task_overrides(task: str, overrides: dict) -> dict:
    """The settings a task implies unless given: one frame at fps 0 for t2i; the sequential inverse for inversion
    (its exact round trip, see ``Pipeline.inversion_edit``)."""
    if task == "t2i":
        return {"frames": 1, "fps": 0, **overrides}
    if task == "inversion":
        return {"jacobi": False, **overrides}
    return overrides


def _read_image(source: Media, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1]."""
    if _is_pixels("image", source, "(H, W, 3)"):
        return media.prepare_image(source, size)
    return media.read_image(source, size)


def _read_clip(source: Media, size: tuple[int, int], frames: int, fps: int, from_end: bool = True) -> np.ndarray:
    """``frames`` frames (T, 3, H, W) float32 in [-1, 1]: the last ones (``from_end``) or the first ones."""
    if _is_pixels("video", source, "(T, H, W, 3)"):
        if source.shape[0] < frames:
            raise ValueError(f"video has {source.shape[0]} frames, {frames} are needed")
        picked = source[-frames:] if from_end else source[:frames]
        return np.stack([media.prepare_image(frame, size) for frame in picked])
    return media.read_video(source, size, frames, fps=fps or None, from_end=from_end).frames


def _is_pixels(name: str, source, layout: str) -> bool:
    """Whether ``source`` is pixels (a numpy array in ``layout``, "(H, W, 3)" or "(T, H, W, 3)", finite) rather
    than a file path; anything else is refused in one line naming ``name``."""
    if isinstance(source, (str, Path)):
        return False
    if not isinstance(source, np.ndarray):
        raise ValueError(f"{name} must be a file path or a numpy array of {layout} pixels, got "
                         f"{type(source).__name__}")
    if source.ndim != layout.count(",") + 1 or source.shape[-1] != 3:
        raise ValueError(f"{name} must be {layout} pixels, got shape {list(source.shape)}")
    if np.issubdtype(source.dtype, np.floating) and not np.isfinite(source).all():
        raise ValueError(f"{name} holds NaN or inf; pixels are uint8, or floats in [-1, 1]")
    return True


@dataclass
class _TaskLatents:
    """What the prefix stage gives the rest of a generation: ``given`` the noised latent of the given frames (the
    prefix, or inversion's source), ``prefix`` the prefilled caches, ``skip`` the prefix frames left out of the
    output (edit, last), ``lead`` latent frames decoded before the sampled ones (extend's first)."""

    given: Optional[mx.array] = None
    prefix: Any = None
    skip: int = 0
    lead: Optional[mx.array] = None
    prefix_frames: Optional[int] = None  # latent frames of the sampled sequence that were given


class _FrameOutput:
    """Sampled latent frames to ``FramesDecoded``, in order, each as soon as it is final.

    When the flow streams frames, each ``FrameSampled`` goes on at once (``sampled``) through the learnable
    denoiser (``FrameDenoiser``) and the VAE's decode streams (one per sample: the decoder's memory is one sample's
    frame). What cannot stream runs in its own stage at the end: the gradient step (every frame depends on every
    other), an image, or everything with ``stream_frames`` off: ``denoise`` the whole latent,
    then ``decode`` the frames not decoded yet. The time spent goes to the stage whose work it is, wherever it ran.
    """

    def __init__(self, pipeline: "Pipeline", settings: Settings, text: mx.array, noise: mx.array, streamed: bool,
                 timings: dict, task: str = "t2v", skip: int = 0, lead: mx.array | None = None):
        self.pipeline, self.settings, self.text, self.timings = pipeline, settings, text, timings
        self.video = noise.ndim == 5
        self.skip, self.lead = skip, lead  # the prefix frames left out of the output; latent frames decoded first
        self.window = pipeline._denoise_window(noise, settings, task)
        learnable = settings.denoise and settings.learnable_denoiser
        self.denoiser = FrameDenoiser(pipeline.flow, text, noise.shape[1], self.window) if (
            streamed and learnable) else None
        self.streamed = streamed and (self.denoiser is not None or not settings.denoise)
        self.streams = None  # the VAE's decode streams, opened at the first frame decoded
        self.pieces: list[np.ndarray] = []  # decoded pixels, unclipped, (B, n, H, W, 3) each
        self.latent_decoded = self.decoded = 0  # latent frames of the sampled sequence decoded or skipped; pixel
        # frames out

    def sampled(self, latent_frames: mx.array) -> Iterator[PipelineEvent]:
        """Latent frames (B, n, C, h, w) the sampler has finished: their events as they become final."""
        if not self.streamed:
            return
        if self.denoiser is None:
            yield from self._decode(latent_frames)
            return
        for event in _timed(self.denoiser.push(latent_frames), "denoise", self.timings):
            yield event
            yield from self._decode(event.latent)

    def denoise(self, sampled: mx.array) -> Iterator[PipelineEvent]:
        """The rest of the denoising, the last event ``Denoised``."""
        if self.denoiser is None:
            yield from _timed(self.pipeline._denoise(sampled, self.text, self.settings, self.window), "denoise",
                              self.timings)
            return
        start = time.perf_counter()
        event = self.denoiser.finish()
        _spend(self.timings, "denoise", start)
        yield event

    def decode(self, latent: mx.array) -> Iterator[PipelineEvent]:
        """The frames of the final latent not decoded yet."""
        frames = latent if self.video else latent[:, None]
        yield from self._decode(frames[:, self.latent_decoded :])
        self.timings.setdefault("decode", 0.0)

    def frames(self) -> np.ndarray:
        """Every decoded frame, (B, T, H, W, 3) float32, not clipped."""
        return np.concatenate(self.pieces, axis=1)

    def output_latent(self, latent: mx.array) -> mx.array:
        """The latent of the output clip: the final latent without the skipped prefix, after the lead frames."""
        if not self.video:
            return latent
        latent = latent[:, self.skip :]
        return latent if self.lead is None else mx.concatenate([self.lead, latent], axis=1)

    def _decode(self, latent_frames: mx.array) -> Iterator[FramesDecoded]:
        for i in range(latent_frames.shape[1]):
            self.latent_decoded += 1
            if self.latent_decoded <= self.skip:
                continue
            if self.streams is None:
                yield from self._open()
            yield self._push(latent_frames[:, i])

    def _open(self) -> Iterator[FramesDecoded]:
        """The VAE's decode streams, one per sample, and the lead frames through them."""
        self.streams = [self.pipeline.vae.decode_stream(tile_size=self.settings.decode_tile_size, channels_last=True)
                        for _ in range(self.settings.num_samples)]
        for i in range(0 if self.lead is None else self.lead.shape[1]):
            yield self._push(self.lead[:, i])

    def _push(self, latent_frame: mx.array) -> FramesDecoded:
        start = time.perf_counter()
        frame = latent_frame.transpose(0, 2, 3, 1)
        pixels = np.concatenate([np.array(stream.push(frame[row : row + 1]), dtype=np.float32)
                                 for row, stream in enumerate(self.streams)])
        self.pieces.append(pixels)
        first, self.decoded = self.decoded, self.decoded + pixels.shape[1]
        _spend(self.timings, "decode", start)
        return FramesDecoded(first, self.decoded, self.settings.frames, np.clip(pixels, -1.0, 1.0))


_DONE = object()


def _timed(events: Iterator, stage: str, timings: dict) -> Iterator:
    """``events`` passed on, the time spent making them (not the caller's time between them) added to
    ``timings[stage]``; closing this closes ``events``."""
    try:
        while True:
            start = time.perf_counter()
            event = next(events, _DONE)
            _spend(timings, stage, start)
            if event is _DONE:
                return
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def _spend(timings: dict, stage: str, start: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _end(stage: str, start: float, timings: dict) -> StageFinished:
    timings[stage] = time.perf_counter() - start
    return StageFinished(stage, timings[stage])


def _stats_record(stats: SamplerStats) -> dict:
    return {
        str(index): {"passes": b.passes, "tokens": b.tokens, "chunks": b.chunks,
                     "max_iterations": max(b.iterations, default=0), "reencodes": b.reencodes}
        for index, b in sorted(stats.blocks.items())
    }


def _cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _run(events: Iterator[PipelineEvent], progress: Callable | None, cancel, on_frame: Callable | None = None,
         ) -> Generation:
    """Run a stream to its ``Generated`` event, calling ``progress`` on each event and ``on_frame`` on each
    ``FramesDecoded``, and checking ``cancel``."""
    try:
        for event in events:
            if progress is not None:
                progress(event)
            if on_frame is not None and isinstance(event, FramesDecoded):
                on_frame(event)
            if isinstance(event, Generated):
                return event.result
            if _cancelled(cancel):
                raise Cancelled("generation cancelled")
    finally:
        events.close()
    raise RuntimeError("the generation stream ended without a result")
