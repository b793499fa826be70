"""The memory planner: the peak memory of a generation, stage by stage, predicted from the configs alone.

No weight is read and nothing large is allocated: ``plan(model, request)`` walks the architecture (flow blocks,
T5, the VAE decoder layer by layer) and the sampler's schedule (chunks, sliding window, denoiser chunks, one latent
frame of VAE decode at a time) and adds up, for each stage, named terms in bytes:

- *resident*: the weights of every part (with ``low_memory`` only the parts the stage needs: ``STAGE_PARTS``) and
  the arrays a stage keeps (text embeddings, latents, KV caches, decoded frames);
- *transient*: the largest working set inside the stage (one transformer layer of the largest chunk, one
  convolution of the VAE decoder), on the chosen backend: ``"cpu"`` (MLX's CPU attention materialises the
  (rows, heads, queries, keys) scores, its convolutions unfold their input) or ``"gpu"`` (Metal/CUDA fused
  attention: no score matrix; 2-D convolutions implicit, 3-D ones still unfolded).

The stages are the pipeline's (``text``, ``prefix`` for i2v/v2v, ``sample``, ``denoise``, ``decode``) and
``score``, the record's bits/dim forward at the end of the pipeline's sample stage. When frames stream
(``Request.stream_frames``, the pipeline's default for a video flow whose shallow blocks work within frames), each
frame is denoised and decoded inside ``sample``, beside the deep block's KV cache, and there is no ``decode``
stage; otherwise they are denoised and decoded after sampling. A model is a ``ModelSpec``: from a pipeline
folder (``from_folder``: its config files only) or a named preset of a released model (``PRESETS``: STARFlow-V
7B T2V, STARFlow 3B T2I) whose weights need not be here. ``fit(model, request, limit)`` changes what the user
left open until the plan fits, or raises ``MemoryLimitError`` with the numbers.

The planner predicts MLX's *active* memory (what ``mx.get_peak_memory`` reports) plus the decoded frames held in
host (numpy) memory; MLX's buffer cache comes on top unless bounded (``cache_limit(plan, limit)``: the headroom).
Its constants for the CPU backend come from ``benchmarks/calibrate_memory.py``; the GPU figures are predictions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import hub, media
from .config import Config, FlowConfig, PipelineConfig, bounded, config_from_official, shown
from .sd_vae import SDVAEConfig
from .t5 import T5Config
from .attention import resolve_kv_group_size
from .tiling import default_overlap, tile_windows
from .wan_vae import WanVAEConfig
from .weights import read_config

TASKS = ("t2v", "t2i", "i2v", "v2v", "edit", "last", "extend", "inversion")
BACKENDS = ("cpu", "gpu")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The pipeline's stages in the order they run; "score" is the record's bits/dim forward at the end of the
# pipeline's sample stage, planned on its own (after sampling's KV caches are freed).
STAGES = ("text", "prefix", "sample", "score", "denoise", "decode")
# With low_memory (pipeline.STAGE_PARTS), the parts resident during each stage: a part is loaded when a stage needs
# it and released when the last stage that needs it ends. Without it, every part is resident throughout. When
# frames stream, the VAE is loaded at the first frame decoded inside the sample stage and stays (``_parts``).
STAGE_PARTS = {
    "text": ("text",), "prefix": ("vae", "flow"), "sample": ("flow",), "score": ("flow",), "denoise": ("flow",),
    "decode": ("vae",),
}
# Tokens per evaluation of the scoring and prefill forwards (flow.SCORE_CHUNK: one latent frame, at most this).
SCORE_CHUNK = 1024
# Float32 scores one quantized attention pass may hold (attention.MAX_SCORES): longer chunks are split by queries.
MAX_SCORES = 2**26
# Layers the flow never quantizes (flow.QUANT_SKIP: latent-wide projections).
FLOW_QUANT_SKIP = ("proj_in", "proj_out")
KV_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
GB = 1e9

# ---- constants of the CPU backend, fitted by benchmarks/calibrate_memory.py on its calibration cases (not the
# ---- ones tests/test_memory.py checks); re-run it after the pipeline changes and paste its output here.
# Live copies of one attention layer's score matrix (rows, heads, queries, keys) at its peak: the scores, and the
# softmax written beside them before they are freed.
CPU_SCORE_COPIES = 1.84
# Live float32 copies of the score matrix of a quantized-KV attention pass (attention.quantized_attention, on every
# backend: the scores, the masked scores, the softmax).
QUANT_SCORE_COPIES = 1.8
# Live copies of one layer's MLP hidden activations (rows, tokens, 4·width): more than the two of one layer, as
# MLX's CPU stream runs ahead of the computation and frees a temporary only when its op has run, so the next
# layers' buffers are allocated while earlier ones are still held.
MLP_COPIES = 6.72
# Live copies of a convolution's unfolded input (MLX's explicit-GEMM convolution: output positions × taps × C_in):
# more than one for the same reason.
CONV_UNFOLD_COPIES = 2.76
# Saved activations of one flow layer kept for the backward pass of the gradient denoising step, in units of
# (rows, tokens, width), and score matrices saved per layer on the CPU backend.
GRAD_SAVED_WIDTHS = 14.21
GRAD_SAVED_SCORES = 2.86
# ---- the GPU backend (Metal, CUDA): not measured here (no GPU on the calibration machine); assumed: fused
# ---- attention keeps no score matrix, a temporary lives until its command buffer completes (two MLP or unfold
# ---- buffers at once), 3-D convolutions are explicit GEMMs (unfolded input) and 2-D ones implicit.
GPU_MLP_COPIES = 2.0
GPU_CONV_UNFOLD_COPIES = 2.0


class MemoryLimitError(ValueError):
    """No plan within the memory limit: the message gives the predicted peak, its stage, the limit and what was
    tried."""


# ----------------------------------------------------------------------------------------------------------------
# The model: configs only
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a pipeline: its parts' configs, the dtype each part's weights are stored in, and
    the quantization a part is stored with ((bits, group_size), or None)."""

    name: str
    pipeline: PipelineConfig
    flow: FlowConfig
    text: T5Config
    vae: WanVAEConfig | SDVAEConfig
    dtypes: dict = field(default_factory=lambda: {"flow": "bfloat16", "text": "bfloat16", "vae": "bfloat16"})
    stored_quantization: dict = field(default_factory=dict)

    @property
    def video(self) -> bool:
        return isinstance(self.vae, WanVAEConfig)


def from_folder(path) -> ModelSpec:
    """A pipeline folder's ``ModelSpec`` from its config files (``hub.read_pipeline_folder``); no weight read."""
    folder = hub.read_pipeline_folder(path)
    raw = {part: read_config(getattr(folder, part)) for part in ("flow", "text", "vae")}
    vae_class = WanVAEConfig if folder.vae_kind == "wan-vae" else SDVAEConfig
    text = _part_config(T5Config, raw["text"], folder.text)
    vae = _part_config(vae_class, raw["vae"], folder.vae)
    dtypes = {part: raw[part].get("dtype") if raw[part].get("dtype") in DTYPE_BYTES else "float32" for part in raw}
    quantized = {
        part: (raw[part]["quantization"]["bits"], raw[part]["quantization"]["group_size"])
        for part in raw if isinstance(raw[part].get("quantization"), dict)
    }
    name = hub.model_name(folder).get("name", str(folder.root))
    return ModelSpec(name, folder.config, folder.flow_config, text, vae, dtypes, quantized)


def _part_config(config_class, raw: dict, folder: Path):
    from .checkpoint import CheckpointError

    try:
        return config_class.from_dict(raw, source=str(folder / "config.json"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# The released models' architecture, as their official YAML (configs/ of apple/ml-starflow) gives it: only the
# fields that size the model; config_from_official reads them as `convert flow` reads the YAML.
OFFICIAL_T2V_7B = {
    "img_size": 640, "txt_size": 256, "vid_size": "81:16", "fps_cond": 1, "channel_size": 48, "patch_size": 1,
    "channels": 3072, "top_block_channels": 4096, "layers_per_block": "2 2 2 2 2 24", "noise_std": 0.5,
    "rope": 1, "sos": 1, "seq_order": "L2R", "pt_seq_len": 32, "mix_aspect": 1, "use_softplus": 1,
    "cond_top_only": 1, "use_final_norm": 1, "learnable_self_denoiser": 1, "conditional_denoiser": 1,
    "denoiser_window": 10, "cond_noise_level": 1, "temporal_causal": 2, "shallow_block_local": 1,
    "vae": "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6", "text": "google/flan-t5-xl", "cfg": 2.5, "soft_clip": 4,
}
OFFICIAL_T2I_3B = {
    "img_size": 256, "txt_size": 128, "channel_size": 4, "patch_size": 1, "channels": 3072,
    "layers_per_block": "2 2 2 2 2 24", "noise_std": 0.3, "rope": 1, "sos": 1, "seq_order": "L2R",
    "use_softplus": 1, "cond_top_only": 1, "use_final_norm": 1, "vae": "stabilityai/sd-vae-ft-ema",
    "text": "google/flan-t5-xl", "cfg": 2.5, "soft_clip": 4,
}


def _preset(name: str, official: dict, vae) -> ModelSpec:
    flow = config_from_official(dict(official), f"preset {name}")
    return ModelSpec(name, PipelineConfig.for_flow(flow), flow, T5Config(), vae)


# Named presets: the released models with flan-T5-XL and their VAE (Wan2.2 / sd-vae-ft-ema defaults), stored in
# bfloat16 as `convert --dtype bfloat16` writes them.
PRESETS = {
    "t2v-7b": lambda: _preset("STARFlow-V 7B T2V", OFFICIAL_T2V_7B, WanVAEConfig()),
    "t2i-3b": lambda: _preset("STARFlow 3B T2I", OFFICIAL_T2I_3B, SDVAEConfig()),
}


def preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {shown(name, 40)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------------------------
# The request
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request(Config):
    """One generation to plan; None takes the pipeline folder's default (``PipelineConfig``) or the pipeline's own
    rule. ``dtype``: the weights' dtype after loading (None: as stored); ``q_bits``: quantize the flow's and
    T5's Linear layers at load; ``kv_bits``: the deep block's quantized KV cache, in groups of ``kv_group_size``
    (None: 64, or 32 where 64 does not divide head_dim, as ``StarFlow.kv_group_size``); ``window``: the deep block's
    sliding window (latent frames); ``decode_tile_size``: VAE decode tiles (latent pixels); ``low_memory``: load
    each part for the stages that need it; ``backend``: "cpu" or "gpu"; ``stream_frames`` (``Settings``): frames
    denoised and decoded inside the sample stage, beside the deep block's KV cache (False: after sampling).
    The shallow blocks of a frame-local video flow are always inverted one frame at a time."""

    model_type = "request"

    task: str = bounded("t2v", choices=TASKS)
    frames: int | None = bounded(None, min=1, max=1 << 16)
    aspect_ratio: str | None = bounded(None, choices=media.ASPECT_RATIOS)
    guidance: float | None = bounded(None, min=0, max=100)
    num_samples: int = bounded(1, min=1, max=64)
    dtype: str | None = bounded(None, choices=tuple(DTYPE_BYTES))
    q_bits: int | None = bounded(None, choices=(4, 8))
    q_group_size: int = bounded(64, choices=GROUP_SIZES)
    kv_bits: int | None = bounded(None, choices=KV_BITS)
    kv_group_size: int | None = bounded(None, choices=GROUP_SIZES)
    jacobi: bool | None = None
    jacobi_block_size: int | None = bounded(None, min=1, max=65536)
    jacobi_growth: int = bounded(4, min=1, max=1024)  # sampler.Jacobi.growth
    window: int | None = bounded(None, min=1, max=1024)
    context_length: int | None = bounded(None, min=0, max=1024)
    given_frames: int | None = bounded(None, min=1, max=1 << 16)
    denoise: bool | None = None
    learnable_denoiser: bool | None = None
    decode_tile_size: int | None = bounded(None, min=1, max=4096)
    low_memory: bool = False
    backend: str = bounded("gpu", choices=BACKENDS)
    stream_frames: bool = True


# Request fields a generation's settings (``pipeline.Settings``, the CLI's options) carry under the same name.
SETTING_FIELDS = (
    "frames", "aspect_ratio", "guidance", "num_samples", "jacobi", "jacobi_block_size", "context_length",
    "denoise", "learnable_denoiser", "kv_bits", "kv_group_size", "window", "decode_tile_size", "stream_frames",
)


def request_from_settings(task: str, settings: dict, **planner) -> Request:
    """The ``Request`` of a generation given as settings (``pipeline.Settings`` fields; those the planner does not
    need, such as the seed, are ignored) and planner fields (``low_memory``, ``backend``, ``dtype``, ...)."""
    return Request(task=task, **{k: v for k, v in settings.items() if k in SETTING_FIELDS}, **planner)


def default_backend() -> str:
    """"gpu" where MLX has a GPU (Metal or CUDA), else "cpu"."""
    import mlx.core as mx

    return "gpu" if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()) else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """``bytes`` of one named thing in a stage; ``host``: numpy memory (outside MLX's counters)."""

    name: str
    bytes: int
    explanation: str
    host: bool = False


@dataclass(frozen=True)
class StagePlan:
    stage: str
    terms: tuple[Term, ...]

    @property
    def peak(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def mlx_peak(self) -> int:
        """The part MLX counts (``mx.get_peak_memory``): every term but the host ones."""
        return sum(t.bytes for t in self.terms if not t.host)


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    request: Request
    stages: tuple[StagePlan, ...]
    shape: dict  # the sizes the plan derived: pixel size, latent frames, tokens per frame, window
    changes: tuple[str, ...] = ()  # what fit changed, in order

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.peak).stage

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    def explain(self) -> list[str]:
        """Lines for a terminal: the request, each stage's peak and its terms, the overall peak."""
        r = self.request
        s = self.shape
        lines = [
            f"{self.model}: {r.task}, {s['frames']} frame(s) {s['height']}x{s['width']}, guidance {s['guidance']}, "
            f"{r.num_samples} sample(s), weights {_weights_text(r, s)}, KV cache "
            f"{'float' if r.kv_bits is None else f'{r.kv_bits}-bit'}, backend {r.backend}"
            + (", low memory" if r.low_memory else ""),
            f"  latent {s['latent_frames']} frame(s) x {s['tokens_per_frame']} tokens, deep block holds "
            f"{s['deep_slots']} slots" + (f" (window {s['window']} frames)" if s["window"] else ""),
        ]
        for stage in self.stages:
            lines.append(f"  {stage.stage:<8} {format_bytes(stage.peak):>10}")
            for term in stage.terms:
                lines.append(f"    {term.name:<22} {format_bytes(term.bytes):>10}  {term.explanation}")
        lines.append(f"  peak {format_bytes(self.peak)} in {self.peak_stage}")
        for change in self.changes:
            lines.append(f"  changed: {change}")
        return lines

    def to_dict(self) -> dict:
        return {
            "model": self.model, "request": dataclasses.asdict(self.request), "shape": dict(self.shape),
            "peak_bytes": self.peak, "peak_stage": self.peak_stage, "changes": list(self.changes),
            "stages": {
                s.stage: {"peak_bytes": s.peak,
                          "terms": [{"name": t.name, "bytes": t.bytes, "explanation": t.explanation, "host": t.host}
                                    for t in s.terms]}
                for s in self.stages
            },
        }


def format_bytes(n: int) -> str:
    """Bytes for a terminal: GB (decimal) with three decimals from 10 MB, else MB with two."""
    return f"{n / GB:.3f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _weights_text(r: Request, s: dict) -> str:
    return f"{r.q_bits}-bit (group {r.q_group_size})" if r.q_bits else s["dtype"]


# ----------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Everything the terms need, derived once from the model and the request."""

    B: int  # samples
    rows: int  # deep-block rows: 2B with guidance
    guidance: float
    T: int  # latent frames (1 for an image)
    h: int  # latent height, width (VAE latent pixels)
    w: int
    F: int  # tokens per latent frame (after patchify)
    L: int  # text tokens
    height: int
    width: int
    pixel_frames: int
    window: Optional[int]  # deep-block sliding window (frames) or None
    overlap: int
    given: int  # latent frames given (i2v / v2v)
    chunk_first: int  # Jacobi chunk tokens in the first frame, and after it
    chunk_later: int
    act: int  # bytes of one activation element of the flow (its compute dtype), and of the VAE
    vae_act: int
    dtype: str
    kv_group: Optional[int]  # the deep block's KV quantization group (None: a float cache)
    streamed: bool  # frames denoised and decoded inside the sample stage (Pipeline._events: _FrameOutput)
    learnable: bool  # denoising with the learnable denoiser (False: the gradient step or none)
    denoise: bool
    denoise_steps: int  # frames per learnable-denoiser chunk (Pipeline._denoise_window)


def plan(model: ModelSpec, request: Request) -> MemoryPlan:
    """The ``MemoryPlan`` of ``request`` on ``model``; raises ``ValueError`` naming what the model cannot make."""
    if not isinstance(request, Request):
        raise ValueError(f"request must be a memory.Request, got {type(request).__name__}")
    s = _shape(model, request)
    weights = _weights(model, request)
    stages = []
    for stage, transient in _stage_terms(model, request, s):
        stages.append(StagePlan(stage, (*_resident(weights, stage, request, s), *transient)))
    shape = {
        "frames": s.pixel_frames, "height": s.height, "width": s.width, "latent_frames": s.T,
        "tokens_per_frame": s.F, "text_tokens": s.L, "window": s.window, "guidance": s.guidance,
        "deep_slots": _deep_slots(s), "dtype": s.dtype, "stream_frames": s.streamed,
        "weights_bytes": {part: b for part, (b, _) in weights.items()},
    }
    return MemoryPlan(model.name, request, tuple(stages), shape)


def _shape(model: ModelSpec, r: Request) -> _Shape:
    flow, defaults = model.flow, model.pipeline
    video_task = r.task != "t2i"
    if video_task and not model.video:
        raise ValueError(f"task {r.task} needs a video model; {model.name} makes images")
    frames = 1 if r.task == "t2i" else (r.frames if r.frames is not None else defaults.frames)
    spatial, temporal = _vae_factors(model.vae)
    if (frames - 1) % temporal:
        raise ValueError(f"frames {frames} cannot be decoded: the VAE makes 1 + {temporal}k frames")
    ratio = r.aspect_ratio or defaults.aspect_ratio
    if ratio not in defaults.aspect_ratios:
        raise ValueError(f"aspect_ratio {ratio!r} is not one this model was trained for: "
                         f"{', '.join(defaults.aspect_ratios)}")
    height, width = media.bucket_size(ratio if flow.mix_aspect else None, flow.img_size * spatial,
                                      spatial * flow.patch_size)
    h, w = height // spatial, width // spatial
    T = sampled_frames(r.task, (frames - 1) // temporal + 1)
    p = flow.patch_size
    F = (h // p) * (w // p)
    guidance = r.guidance if r.guidance is not None else defaults.guidance
    window = _window(model, r, T)
    if r.task == "inversion" and window is not None:
        # as Pipeline._check_inversion_length: generation refuses it, so a plan of it would plan nothing that runs
        raise ValueError(f"inversion editing of {T} latent frames needs the deep block's sliding window (window "
                         f"{window}), which the forward pass does not invert exactly")
    context = r.context_length if r.context_length is not None else defaults.context_length
    overlap = 0 if window is None else min(context, window - 1)
    given = 0
    if r.task in ("i2v", "last"):
        given = 1
    elif r.task == "edit":
        given = T // 2
    elif r.task in ("v2v", "extend"):
        given = (given_frames(r.task, r.given_frames, frames, temporal) - 1) // temporal + 1
        given -= r.task == "extend"  # its first latent frame goes to the decoder, not the flow
    if r.given_frames is not None and r.task not in ("v2v", "extend"):
        raise ValueError(f"given_frames is an argument of video_to_video and extend, not of task {r.task}")
    # inversion samples with the sequential inverse unless told (``Pipeline.inversion_edit``: the exact round trip)
    jacobi = r.jacobi if r.jacobi is not None else defaults.jacobi and r.task != "inversion"
    block = (r.jacobi_block_size or defaults.jacobi_block_size) if jacobi else 1
    growth = r.jacobi_growth if jacobi else 1
    dtype = r.dtype or model.dtypes.get("flow", "float32")
    B = r.num_samples
    denoise = r.denoise if r.denoise is not None else defaults.denoise
    learnable = denoise and (r.learnable_denoiser if r.learnable_denoiser is not None else defaults.learnable_denoiser)
    local_video = model.video and T > 1 and flow.shallow_block_local
    return _Shape(
        B=B, rows=2 * B if guidance > 0 else B, guidance=guidance, T=T, h=h, w=w, F=F, L=flow.txt_size,
        height=height, width=width, pixel_frames=frames, window=window, overlap=overlap, given=given,
        chunk_first=block, chunk_later=block * growth, act=DTYPE_BYTES[dtype],
        vae_act=DTYPE_BYTES[r.dtype or model.dtypes.get("vae", "float32")], dtype=dtype,
        kv_group=resolve_kv_group_size(r.kv_bits, r.kv_group_size, flow.head_dim, "Request."),
        streamed=bool(r.stream_frames and local_video and (learnable or not denoise)), learnable=learnable,
        denoise=denoise, denoise_steps=min(T, _denoise_window(model, r, T) or flow.local_attn_window or T),
    )


def given_frames(task: str, given: int | None, frames: int, temporal: int) -> int:
    """The pixel frames of the given clip that video-to-video and extension keep (``Pipeline`` and the planner
    both): ``given``, checked, else the longest 1 + ``temporal``·k up to half the clip. Extension continues the
    given latent frames after the first, so it needs two of them."""
    least = 1 + temporal if task == "extend" else 1
    if given is None:
        if task == "extend" and frames < 1 + 2 * temporal:
            raise ValueError(f"frames {frames}: extend needs a longer clip, at least {1 + 2 * temporal} frames")
        clip = (frames - 1) // temporal + 1
        return max(least, 1 + temporal * max(0, clip // 2 - 1))
    if given < least:
        raise ValueError(f"given_frames {given}: extend needs at least {least} frames (its first latent frame is "
                         f"not continued)")
    if (given - 1) % temporal or given >= frames:
        raise ValueError(f"given_frames {given} must be 1 + {temporal}k frames and fewer than frames {frames}")
    return given


def _vae_factors(vae) -> tuple[int, int]:
    if isinstance(vae, WanVAEConfig):
        return vae.spatial_factor, vae.temporal_factor
    return 2 ** (len(vae.block_out_channels) - 1), 1


def sampled_frames(task: str, clip: int) -> int:
    """The latent frames a task samples for an output clip of ``clip`` (``Pipeline._latent_shape``): an edit's
    source before it, last-frame conditioning's image, extension's without its first."""
    return {"edit": 2 * clip, "last": clip + 1, "extend": clip - 1}.get(task, clip)


def trained_frames(task: str, clip: int) -> int:
    """The latent frames of the sequences ``task`` was trained on, for a training clip of ``clip``: the clip, plus
    an edit's source or last-frame conditioning's image."""
    return sampled_frames(task, clip) if task in ("edit", "last") else clip


def _window(model: ModelSpec, r: Request, T: int) -> Optional[int]:
    """The deep block's sliding window (``Pipeline._window``): the request's, the model's own, or the task's
    training length for a sequence longer than it."""
    if not model.video or T == 1:
        return None
    window = r.window if r.window is not None else model.flow.local_attn_window
    clip = (model.pipeline.frames - 1) // _vae_factors(model.vae)[1] + 1
    trained = trained_frames(r.task, clip)
    if window is None and T > trained:
        window = trained
    if window is None or window < 2 or window >= T:
        return None
    return window


def _denoise_window(model: ModelSpec, r: Request, T: int) -> Optional[int]:
    """The learnable denoiser's chunk (``Pipeline._denoise_window``): the deep block's window as the pipeline
    passes it (the request's even where it is the whole clip), widened to ``denoiser_window`` + 1 frames where it
    is shorter."""
    window = r.window if r.window is not None else _window(model, r, T)
    shared = model.flow.denoiser_window
    if window is not None and shared is not None and window <= shared:
        return shared + 1
    return window


# ---- weights ----


def _weights(model: ModelSpec, r: Request) -> dict[str, tuple[int, str]]:
    """Bytes and a one-line description of each part's weights as loaded."""
    out = {}
    for part, config in (("flow", model.flow), ("text", model.text), ("vae", model.vae)):
        dtype = r.dtype or model.dtypes.get(part, "float32")
        elements = DTYPE_BYTES[dtype]
        stored = model.stored_quantization.get(part)
        quant = stored or ((r.q_bits, r.q_group_size) if r.q_bits and part in ("flow", "text") else None)
        linears = _linear_shapes(part, config)
        total = config.parameter_count()
        if quant is None:
            out[part] = (total * elements, f"{_count(total)} parameters in {dtype}")
            continue
        bits, group = quant
        packed = sum(o * i for o, i in linears if i % group == 0)
        quantized_bytes = sum(o * i * bits // 8 + 2 * o * (i // group) * elements for o, i in linears if i % group == 0)
        out[part] = ((total - packed) * elements + quantized_bytes,
                     f"{_count(total)} parameters, Linear weights {bits}-bit (group {group}), the rest {dtype}")
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _linear_shapes(part: str, config) -> list[tuple[int, int]]:
    """(out, in) of the Linear weights a part's quantization would pack."""
    if part == "text":
        d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
        per_layer = [(inner, d)] * 3 + [(d, inner)] + [(ff, d)] * (2 if config.gated else 1) + [(d, ff)]
        return per_layer * config.num_layers
    if part != "flow":
        return []  # the VAEs are never quantized
    shapes = []
    for i, layers in enumerate(config.layers_per_block):
        width = config.top_channels if i == config.num_blocks - 1 else config.channels
        shapes += _layer_linears(width) * layers
        if i == config.num_blocks - 1:
            shapes.append((width, config.txt_dim))
    if config.learnable_self_denoiser:
        shapes += _layer_linears(config.channels) * 8
        if config.conditional_denoiser:
            shapes.append((config.channels, config.txt_dim))
    return shapes


def _layer_linears(width: int) -> list[tuple[int, int]]:
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]


def _resident(weights: dict, stage: str, r: Request, s: _Shape) -> list[Term]:
    parts = STAGE_PARTS[stage] if r.low_memory else ("text", "flow", "vae")
    if r.low_memory and s.streamed and stage in ("sample", "score", "denoise"):
        parts = (*parts, "vae")  # loaded at the first frame decoded while sampling, kept to the end
    names = {"text": "T5 weights", "flow": "flow weights", "vae": "VAE weights"}
    return [Term(names[p], weights[p][0], weights[p][1]) for p in parts]


# ---- stage terms ----


def _stage_terms(model: ModelSpec, r: Request, s: _Shape):
    yield "text", _text_terms(model, s)
    if s.given:
        yield "prefix", _prefix_terms(model, r, s)
    if r.task == "inversion":
        yield "prefix", _inversion_terms(model, r, s)
    yield "sample", _sample_terms(model, r, s)
    yield "score", _score_terms(model, r, s)
    if s.denoise:
        yield "denoise", _denoise_terms(model, r, s)
    if not s.streamed:  # streamed, every frame was decoded inside the sample stage
        yield "decode", _decode_terms(model, r, s)


def _text_terms(model: ModelSpec, s: _Shape) -> list[Term]:
    t5 = model.text
    rows = s.B + (1 if s.guidance > 0 else 0)
    ff = t5.d_ff * (2 if t5.gated else 1)
    working = s.B * s.L * (ff + 4 * t5.d_model) * s.act + s.B * t5.num_heads * s.L * s.L * 4
    return [
        Term("text embeddings", rows * s.L * t5.d_model * 4, f"{rows} row(s) x {s.L} tokens x {t5.d_model}, float32"),
        Term("T5 activations", working, f"one layer's feed-forward and attention for {s.B} row(s)"),
    ]


def _text_kept(model: ModelSpec, s: _Shape) -> Term:
    rows = s.B + (1 if s.guidance > 0 else 0)
    return Term("text embeddings", rows * s.L * model.text.d_model * 4, "float32")


def _kept_arrays(model: ModelSpec, s: _Shape) -> int:
    """The latents a generation keeps after sampling: noise, sampled and denoised latents (float32)."""
    return 3 * s.B * s.T * s.h * s.w * model.flow.in_channels * 4


def _deep_slots(s: _Shape) -> int:
    """Slots of the deep block's cache (``StarFlow.make_cache``): the text and the window's frames (or all)."""
    return s.L + s.F * (s.T if s.window is None else min(s.T, s.window))


def _deep_cache(model: ModelSpec, r: Request, s: _Shape) -> Term:
    flow = model.flow
    slots = _deep_slots(s)
    elements = flow.layers_per_block[-1] * 2 * s.rows * slots * flow.top_channels
    size, text = _cache_bytes(elements, s.act, r.kv_bits, s.kv_group)
    return Term("KV cache (deep block)", size,
                f"{flow.layers_per_block[-1]} layers x 2 x {s.rows} rows x {flow.top_channels // flow.head_dim} heads "
                f"x {slots} slots x {flow.head_dim}, {text}")


def _cache_bytes(elements: int, act: int, bits: Optional[int], group: Optional[int]) -> tuple[int, str]:
    if bits is None:
        return elements * act, f"{act * 8}-bit"
    # MLX affine packing: bits/8 bytes per element, a scale and a bias per group in the activation dtype
    return elements * bits // 8 + 2 * (elements // group) * act, f"{bits}-bit (group {group})"


def _local(model: ModelSpec, s: _Shape) -> bool:
    """Whether the shallow blocks work within frames (then always one frame at a time while sampling)."""
    return bool(model.flow.shallow_block_local and s.T > 1)


def _shallow_caches(model: ModelSpec, s: _Shape) -> Term:
    flow = model.flow
    slots = s.F if _local(model, s) else s.F * s.T
    layers = sum(flow.layers_per_block[:-1])
    size = layers * 2 * s.B * slots * flow.channels * s.act
    return Term("KV caches (shallow)", size, f"{layers} layers x 2 x {s.B} rows x {slots} slots x {flow.channels}")


def _attention_layer(rows: int, queries: int, keys: int, width: int, heads: int, act: int, backend: str,
                     mask: str | None = None, quantized: bool = False) -> int:
    """One transformer layer's working set beyond its input: the MLP's hidden activations, and the attention's
    score matrices: on the CPU those of MLX's attention, on every backend those of the quantized-KV attention
    (float32, split to at most ``MAX_SCORES`` per pass), none of the GPU's fused kernel. ``mask``: "causal"
    (built by the CPU fallback and the quantized attention, none on the GPU) or "array" (a boolean (queries,
    keys) array on both)."""
    mlp = (MLP_COPIES if backend == "cpu" else GPU_MLP_COPIES) * rows * queries * 4 * width * act
    attention = 4 * rows * queries * width * act  # q, k, v of the new tokens and the output
    if quantized:
        per_pass = queries if mask is None else min(queries, max(1, MAX_SCORES // (rows * heads * keys)))
        attention += QUANT_SCORE_COPIES * rows * heads * per_pass * keys * 4 + per_pass * keys
    elif backend == "cpu":
        attention += CPU_SCORE_COPIES * rows * heads * queries * keys * act
    mask_bytes = queries * keys if mask == "array" or (mask == "causal" and backend == "cpu" and not quantized) else 0
    return int(max(mlp, attention) + mask_bytes)


def _deep_passes(s: _Shape) -> list[tuple[int, int, str]]:
    """(queries, keys, what) of the deep block's distinct passes, as ``sampler.BlockSolve.run`` schedules them:
    the text, every Jacobi chunk (``block_size`` tokens in the first frame, ``growth`` times that after it, cut at
    the window's end) and each sliding-window re-encode of ``overlap`` frames."""
    total, F = s.F * s.T, s.F
    span = total if s.window is None else min(total, s.window * F)
    passes = {(s.L, s.L, f"text prefix ({s.L} tokens)")}
    solved, cached, target = s.given * F, s.given * F, span
    if s.chunk_later == 1:  # sequential: one token per pass, the last one sees the whole window
        return [*passes, (1, s.L + min(span, total), "sequential step")]
    while True:
        while solved < target:
            size = min(s.chunk_first if solved <= F else s.chunk_later, target - solved)
            passes.add((size, s.L + cached + size, f"chunk of {size} tokens"))
            solved, cached = solved + size, cached + size
        if target >= total:
            return sorted(passes)
        n = s.overlap * F
        passes.add((n, s.L + n, f"window re-encode ({s.overlap} frames)"))
        target, cached = min(total, solved + span - n), n


def _sample_terms(model: ModelSpec, r: Request, s: _Shape) -> list[Term]:
    """Sampling: the deep block's cache and its largest pass, the shallow blocks one frame at a time; when frames
    stream, the denoiser's passes and the VAE's decode of a frame run beside the cache, and the decode streams'
    causal caches and the decoded frames (host) grow to the whole clip."""
    flow = model.flow
    heads = flow.top_channels // flow.head_dim
    quantized = r.kv_bits is not None
    work = [
        (_attention_layer(s.rows, q, k, flow.top_channels, heads, s.act, r.backend, "causal" if q > 1 else None,
                          quantized), f"one deep layer, {what} x {k} keys, {s.rows} rows")
        for q, k, what in _deep_passes(s)
    ]
    shallow_keys = s.F if _local(model, s) else s.F * s.T
    work.append((_attention_layer(s.B, s.chunk_first, shallow_keys, flow.channels, flow.channels // flow.head_dim,
                                  s.act, r.backend), f"one shallow layer, chunk of {s.chunk_first} tokens"))
    state = (2 * s.rows + s.B) * (s.F * s.T + 1) * flow.patch_channels * 4
    terms = [
        _text_kept(model, s),
        _deep_cache(model, r, s),
        _shallow_caches(model, s),
        Term("sampler state", state + _kept_arrays(model, s) // 3, "noise and the solved tokens (float32)"),
    ]
    if s.streamed:
        terms.append(Term("denoised frames", 2 * _kept_arrays(model, s) // 3,
                          "the frame denoiser's inputs and outputs (float32)"))
        if s.learnable:
            work.append(_denoiser_pass(model, r, s))
        caches, decode = _streamed_decode(model, r, s)
        terms.append(caches)
        work.append((decode.bytes, f"VAE decode of a frame ({decode.explanation})"))
        terms.append(Term("frames (host)", _frames_bytes(s), "decoded frames so far, float32 numpy", host=True))
    bytes_, what = max(work)
    terms.append(Term("activations", bytes_, what))
    return terms


def _denoiser_pass(model: ModelSpec, r: Request, s: _Shape) -> tuple[int, str]:
    """One learnable-denoiser layer over a whole chunk (the largest pass), and its boolean (S, S) mask."""
    flow = model.flow
    n = (s.L if flow.conditional_denoiser else 0) + s.denoise_steps * s.F
    layer = _attention_layer(s.B, n, n, flow.channels, flow.channels // flow.head_dim, s.act, r.backend,
                             "array" if s.T > 1 and flow.temporal_causal > 0 else None)
    return layer, f"one denoiser layer over {s.denoise_steps} frames ({n} tokens) and its mask"


def _prefix_terms(model: ModelSpec, r: Request, s: _Shape) -> list[Term]:
    """The prefill: the given frames' forward one latent frame at a time into the sampling caches."""
    flow = model.flow
    n = s.L + s.given * s.F
    chunk = min(SCORE_CHUNK, s.F)
    heads = flow.top_channels // flow.head_dim
    layer = _attention_layer(s.rows, chunk, n, flow.top_channels, heads, s.act, r.backend, "causal",
                             r.kv_bits is not None)
    outputs = (3 * flow.num_blocks + 1) * s.rows * s.F * s.given * flow.patch_channels * 4
    return [
        _text_kept(model, s),
        _deep_cache(model, r, s),
        _shallow_caches(model, s),
        _vae_encode_term(model, r, s),
        Term("block outputs", outputs, "every block's output, log-determinant and input (float32)"),
        Term("activations", layer, f"one deep layer of the prefill ({chunk} of {n} tokens, {s.rows} rows)"),
    ]


def _inversion_terms(model: ModelSpec, r: Request, s: _Shape) -> list[Term]:
    """Inversion's forward of the source to the flow's noise: the scoring forward on the guided rows (both
    halves of classifier-free guidance), its caches in float (``Pipeline._to_noise``), and the VAE's encode."""
    guided = dataclasses.replace(s, B=s.rows)
    return [*_score_terms(model, dataclasses.replace(r, kv_bits=None), guided), _vae_encode_term(model, r, s)]


def _denoise_terms(model: ModelSpec, r: Request, s: _Shape) -> list[Term]:
    kept = Term("latents", _kept_arrays(model, s), "noise, sampled and denoised latents (float32)")
    text = _text_kept(model, s)
    if s.streamed:  # every frame was denoised while sampling: the frames put together
        caches, _ = _streamed_decode(model, r, s)
        return [kept, text, caches, Term("frames (host)", _frames_bytes(s), "decoded frames, float32 numpy",
                                         host=True)]
    if s.learnable:
        layer, what = _denoiser_pass(model, r, s)
        return [kept, text, Term("denoiser chunk", layer, what)]
    return [kept, text, _gradient_term(model, r, s)]


def _gradient_term(model: ModelSpec, r: Request, s: _Shape) -> Term:
    """The gradient step: a forward whose activations are kept for the backward pass."""
    flow = model.flow
    total = 0
    for i, layers in enumerate(flow.layers_per_block):
        deep = i == flow.num_blocks - 1
        width = flow.top_channels if deep else flow.channels
        n = s.F * s.T + (s.L if deep else 0)
        saved = GRAD_SAVED_WIDTHS * s.B * n * width * s.act
        if r.backend == "cpu":
            saved += GRAD_SAVED_SCORES * s.B * (width // flow.head_dim) * n * n * max(s.act, 4)
        total += layers * saved
    return Term("gradient step", int(total), "the flow's activations kept for the backward pass")


def _score_terms(model: ModelSpec, r: Request, s: _Shape) -> list[Term]:
    """The record's bits/dim: the flow's forward on the sampled latent (B rows, no guidance), one latent frame of
    tokens per evaluation through a KV cache of each block's whole sequence (``StarFlow.score_chunk``), the deep
    block's at the sampler's ``kv_bits``."""
    flow = model.flow
    chunk = min(SCORE_CHUNK, s.F)
    local = _local(model, s)
    blocks = []
    for i, layers in enumerate(flow.layers_per_block):
        deep = i == flow.num_blocks - 1
        width = flow.top_channels if deep else flow.channels
        rows, slots = (s.B * s.T, s.F) if local and not deep else (s.B, s.F * s.T + (s.L if deep else 0))
        quantized = deep and r.kv_bits is not None  # the deep block scores through the sampler's cache precision
        cache, precision = _cache_bytes(layers * 2 * rows * slots * width, s.act, r.kv_bits if deep else None,
                                        s.kv_group)
        text = (s.L, s.L) if deep else (0, 0)
        layer = max(_attention_layer(rows, min(chunk, slots), slots, width, width // flow.head_dim, s.act,
                                     r.backend, "causal", quantized),
                    _attention_layer(rows, *text, width, width // flow.head_dim, s.act, r.backend, "causal",
                                     quantized))
        blocks.append((cache + layer, cache, layer, "deep" if deep else f"shallow {i}", slots, rows, precision))
    _, cache, layer, name, slots, rows, precision = max(blocks)
    outputs = (3 * flow.num_blocks + 1) * s.B * s.F * s.T * flow.patch_channels * 4
    terms = [
        Term("latents", _kept_arrays(model, s), "noise, sampled and denoised latents (float32)"),
        _text_kept(model, s),
        Term("block outputs", outputs, "every block's output, log-determinant and input (float32)"),
        Term("KV cache (scoring)", cache, f"the {name} block's {slots} slots x {rows} rows, {precision}"),
        Term("activations", layer, f"one {name} layer of a {chunk}-token chunk"),
    ]
    if s.streamed:
        terms += [_streamed_decode(model, r, s)[0],
                  Term("frames (host)", _frames_bytes(s), "decoded frames, float32 numpy", host=True)]
    return terms


def _frames_bytes(s: _Shape) -> int:
    return s.B * s.pixel_frames * s.height * s.width * 3 * 4


# ---- the VAE ----


def _decode_terms(model: ModelSpec, r: Request, s: _Shape) -> list[Term]:
    kept = Term("latents", _kept_arrays(model, s), "noise, sampled and denoised latents (float32)")
    host = Term("frames (host)", _frames_bytes(s), "decoded frames, float32 numpy", host=True)
    if isinstance(model.vae, WanVAEConfig):
        caches, working = _streamed_decode(model, r, s)
        return [kept, caches, working, host]
    tiles = _tiles(s.h, s.w, r.decode_tile_size)
    th, tw = max(t[2] for t in tiles), max(t[3] for t in tiles)
    tiled = "" if r.decode_tile_size is None else f", {len(tiles)} tiles of up to {th}x{tw}"
    working = _sd_decode(model.vae, th, tw, s.vae_act, r.backend)
    return [kept, Term("VAE decode", working, f"the largest conv's unfolded input, its neighbours and norms{tiled}"),
            host]


def _streamed_decode(model: ModelSpec, r: Request, s: _Shape) -> tuple[Term, Term]:
    """The Wan VAE's decode streams (``Pipeline._FrameOutput``: one per sample, alive from the first frame decoded
    to the end): their causal caches, and the working set of decoding one latent frame of one sample."""
    tiles = _tiles(s.h, s.w, r.decode_tile_size)
    th, tw = max(t[2] for t in tiles), max(t[3] for t in tiles)
    tiled = "" if r.decode_tile_size is None else f", {len(tiles)} tiles of up to {th}x{tw}"
    working, _ = _wan_decode(model.vae, th, tw, s.vae_act, r.backend)
    caches = s.B * sum(_wan_decode(model.vae, t[2], t[3], s.vae_act, r.backend)[1] for t in tiles)
    frame = 2 * model.vae.temporal_factor * s.height * s.width * 3 * 4  # one latent frame's pixels, and float32
    return (Term("VAE causal caches", caches, f"two frames per causal conv, {s.B} stream(s){tiled}"),
            Term("VAE decode", working + frame, f"one latent frame{tiled}: the largest conv's unfolded input, its "
                                                "neighbours and norms"))


def _tiles(h: int, w: int, tile: Optional[int]) -> list[tuple[int, int, int, int]]:
    """The decoder's spatial tiles (``tiling.tile_windows``, default overlap): (y0, x0, height, width)."""
    if tile is None:
        return [(0, 0, h, w)]
    return tile_windows(h, w, tile, default_overlap(tile, None))


def _conv_working(cin: int, cout: int, t_in: int, t_out: int, h: int, w: int, taps: int, pad: int, act: int,
                  backend: str, three_d: bool) -> int:
    """A convolution's working set: its padded input, the unfolded input (an explicit GEMM: every convolution on
    the CPU, 3-D ones on the GPU), the output, and the input kept for the residual."""
    padded = t_in * (h + 2 * pad) * (w + 2 * pad) * cin * act
    copies = CONV_UNFOLD_COPIES if backend == "cpu" else (GPU_CONV_UNFOLD_COPIES if three_d else 0)
    unfolded = copies * t_out * h * w * taps * cin * act
    return int(padded + unfolded + t_out * h * w * (cout + cin) * act + t_out * h * w * cin * 4)


def _wan_decode(vae: WanVAEConfig, h: int, w: int, act: int, backend: str) -> tuple[int, int]:
    """(the largest working set of one later latent frame's decode, the causal caches' bytes) for one sample,
    layer by layer as ``wan_vae.Decoder`` runs them: every 3x3x3 causal conv sees its two kept frames before the
    chunk; time upsampling doubles the frames of a chunk."""
    mult = vae.dim_mult
    dims = [vae.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_up = list(vae.temporal_downsample[::-1])
    n = len(mult)
    t, peak, caches = 1, 0, 0

    def conv3(cin, cout):
        nonlocal peak, caches
        peak = max(peak, _conv_working(cin, cout, t + 2, t, h, w, 27, 1, act, backend, True))
        caches += 2 * h * w * cin * act

    conv3(vae.z_dim, dims[0])
    for _ in range(2):
        conv3(dims[0], dims[0]); conv3(dims[0], dims[0])  # noqa: E702
    peak = max(peak, t * (h * w) ** 2 * (4 if backend == "cpu" else 0) * 2)  # the mid attention's scores
    for i in range(n):
        cin, cout = dims[i], dims[i + 1]
        for j in range(vae.num_res_blocks + 1):
            conv3(cin if j == 0 else cout, cout)
            conv3(cout, cout)
        if i < n - 1:
            if temporal_up[i]:
                peak = max(peak, _conv_working(cout, 2 * cout, t + 2, t, h, w, 3, 0, act, backend, True))
                caches += 2 * h * w * cout * act
                t *= 2
            h, w = 2 * h, 2 * w
            peak = max(peak, _conv_working(cout, cout, t, t, h, w, 9, 1, act, backend, False))
    conv3(dims[-1], vae.image_channels * vae.patch_size**2)
    return peak, caches


def _sd_decode(vae: SDVAEConfig, h: int, w: int, act: int, backend: str) -> int:
    widths = vae.block_out_channels[::-1]
    peak = _conv_working(vae.latent_channels, widths[0], 1, 1, h, w, 9, 1, act, backend, False)
    peak = max(peak, (h * w) ** 2 * (4 if backend == "cpu" else 0) * 2)
    for i, width in enumerate(widths):
        cin = widths[max(i - 1, 0)]
        for j in range(vae.layers_per_block + 1):
            peak = max(peak, _conv_working(cin if j == 0 else width, width, 1, 1, h, w, 9, 1, act, backend, False))
        if i < len(widths) - 1:
            h, w = 2 * h, 2 * w
            peak = max(peak, _conv_working(width, width, 1, 1, h, w, 9, 1, act, backend, False))
    return peak


def _vae_encode_term(model: ModelSpec, r: Request, s: _Shape) -> Term:
    """The given frames' encode (i2v / v2v): taken as large as one decode chunk's working set."""
    working, caches = _wan_decode(model.vae, s.h, s.w, s.vae_act, r.backend)
    return Term("VAE encode", working + caches, "the given frames' encode, as one decode chunk")


# ----------------------------------------------------------------------------------------------------------------
# Fitting a limit
# ----------------------------------------------------------------------------------------------------------------

# The stages the VAE decodes in (``_vae_stages``): its own, or those frames stream out of.
VAE_STAGES = "the VAE's"
STREAM_OFF = "stream_frames off (frames leave after sampling; results unchanged)"
# Decode tiles fit tries, in latent pixels (the seams change slightly; results otherwise unchanged).
DECODE_TILES = (32, 16)


def fit(model: ModelSpec, request: Request, limit: int | float, fixed: frozenset | set = frozenset()) -> MemoryPlan:
    """The plan of ``request`` that fits ``limit`` bytes, changing in order only the fields not in ``fixed``:
    ``low_memory`` on (results unchanged), ``stream_frames`` off (frames denoised and decoded after sampling, when
    the deep block's KV cache is gone; results unchanged), VAE decode tiles (the seams change slightly), an 8-bit
    then a 4-bit KV cache; a change is made only while a stage it lowers is over the limit. Raises
    ``MemoryLimitError`` with the numbers when nothing fits; reads no weight."""
    limit = _check_limit(limit)
    current = plan(model, request)
    tried = []
    for name, value, words, stages in _steps(request, fixed):
        if current.peak <= limit:
            break
        stages = _vae_stages(current) if stages == VAE_STAGES else stages
        if not any(s.peak > limit for s in current.stages if s.stage in stages):
            continue  # the stages this step lowers fit already: keep the user's setting
        if name == "stream_frames" and not current.shape["stream_frames"]:
            continue  # nothing streams (an image, a flow whose shallow blocks see every frame)
        candidate = dataclasses.replace(current.request, **{name: value})
        tried.append(words)
        current = dataclasses.replace(plan(model, candidate), changes=(*current.changes, words))
    if current.peak > limit:
        what = ", ".join(tried) if tried else "nothing (every setting was fixed)"
        raise MemoryLimitError(
            f"predicted peak {format_bytes(current.peak)} in {current.peak_stage} exceeds the memory limit "
            f"{format_bytes(limit)}; tried: {what}"
        )
    return current


def _vae_stages(plan_: MemoryPlan) -> tuple[str, ...]:
    """The stages whose peak holds the VAE's decode: its working set or its causal caches."""
    return tuple(s.stage for s in plan_.stages
                 if any(t.name in ("VAE decode", "VAE causal caches") for t in s.terms))


def _steps(request: Request, fixed):
    """(field, value, words, the stages it lowers) of each change ``fit`` may make, in its order."""
    if "low_memory" not in fixed and not request.low_memory:
        yield "low_memory", True, "low_memory on", STAGES
    if "stream_frames" not in fixed and request.stream_frames:
        yield "stream_frames", False, STREAM_OFF, ("sample", "score", "denoise")
    if "decode_tile_size" not in fixed and request.decode_tile_size is None:
        for tile in DECODE_TILES:
            yield "decode_tile_size", tile, f"decode tiles of {tile} latent pixels", VAE_STAGES
    if "kv_bits" not in fixed:
        for bits in (8, 4):
            if request.kv_bits is None or bits < request.kv_bits:
                yield "kv_bits", bits, f"{bits}-bit KV cache", ("sample", "prefix")


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"memory limit must be a positive number of bytes, got {shown(limit, 40)}")
    return int(limit)


def cache_limit(plan_: MemoryPlan, limit: int) -> int:
    """MLX buffer-cache bytes that keep a generation of ``plan_`` within ``limit``: the headroom left above its
    predicted peak (freed buffers MLX keeps for reuse count against the machine like active ones)."""
    return max(0, int(limit) - plan_.peak)


def default_limit() -> tuple[int, str]:
    """A safe share of this machine's memory and where it comes from: on a Mac, MLX's recommended working set
    (``max_recommended_working_set_size``, ~75% of RAM, what Metal lets one process keep resident without
    swapping); elsewhere 75% of physical memory, the same share."""
    import os

    import mlx.core as mx

    info = {}
    if hasattr(mx, "device_info"):
        try:
            info = mx.device_info()
        except Exception:  # noqa: BLE001 - a backend without device info: fall back to physical memory
            info = {}
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "the GPU's recommended working set"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(physical * 0.75), "75% of physical memory"
