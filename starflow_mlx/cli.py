"""``starflow-mlx`` command line: ``generate`` (a prompt, and an image or a clip, in; an mp4 or PNG with its settings
out), ``score`` (bits/dim of a clip or image under captions), ``info`` (the settings back from a written file, or
what a model is), ``plan`` (the peak memory a generation will need, from config files alone) and
``convert <kind>``. ``--model`` is optional wherever it is taken: without it, the model shipped
in the package (``hub.default_model``). Results go to stdout; progress bars (stderr) and messages (``logging``) to
stderr.

Every failure is one line, ``error: ...``, never a traceback: exit status 2 for what the user can fix (a source, an
argument, the output folder, a full disk, too little memory), 130 after Ctrl-C and 143 after SIGTERM (the partial
output removed first), and 1 for an internal error, whose traceback ``-v`` shows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("starflow_mlx")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, like Ctrl-C, so that the same cleanup runs."""


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line too (argparse prints the whole usage above its error)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .convert import flow, pipeline, sd_vae, t5, wan_vae

    parser = _Parser(prog="starflow-mlx", description="STARFlow / STARFlow-V in MLX")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the traceback of an internal error"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    kinds = commands.add_parser("convert", help="convert released checkpoints into MLX model folders").add_subparsers(
        dest="kind", required=True
    )
    # Each converter registers ``convert <kind>`` and sets ``func`` to a callable taking the parsed arguments.
    for converter in (flow, t5, wan_vae, sd_vae, pipeline):
        converter.add_parser(kinds)
    _add_generate(commands)
    _add_score(commands)
    _add_info(commands)
    _add_plan(commands)
    _add_helper(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    with _sigterm_raises():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except Terminated:
        log.error("error: terminated (SIGTERM); the partial output was removed")
        return 143
    except KeyboardInterrupt:
        log.error("error: interrupted (Ctrl-C); the partial output was removed")
        return 130
    except ValueError as e:  # CheckpointError, OutputFolderError, bad arguments: each names what is wrong
        log.error("error: %s", e)
        return 2
    except OSError as e:  # a source that cannot be read
        log.error("error: %s", f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e)
        return 2
    except MemoryError:
        log.error("error: out of memory; convert with --dtype bfloat16 (or quantize with --q-bits 8) to need less")
        return 2
    except Exception as e:
        log.error(
            "error: internal error: %s: %s (run with -v for the traceback)", type(e).__name__, e, exc_info=args.verbose
        )
        return 1
    return 0


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises ``Terminated``; Python can only install handlers in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------

DTYPES = ("float32", "float16", "bfloat16")
# CLI option -> pipeline.Settings field; an option not given keeps the pipeline folder's default.
SETTING_OPTIONS = {
    "frames": "frames", "aspect_ratio": "aspect_ratio", "fps": "fps", "cfg": "guidance", "jacobi": "jacobi",
    "jacobi_block_size": "jacobi_block_size", "jacobi_threshold": "jacobi_threshold",
    "jacobi_max_iter": "jacobi_max_iter", "denoise": "denoise", "learnable_denoiser": "learnable_denoiser",
    "denoise_step_size": "denoise_step_size", "target_noise_std": "target_noise_std",
    "context_length": "context_length", "kv_bits": "kv_bits", "kv_group_size": "kv_group_size", "window": "window",
    "stream": "stream_frames", "decode_tile_size": "decode_tile_size",
}


def _add_generate(commands) -> None:
    p = commands.add_parser(
        "generate", help="a video (mp4) or image (PNG) from a prompt, and an image or clip to start from",
        description="Sample from a pipeline folder (or a hub repo of one). Options not given take the folder's "
        "defaults (the official sample.py settings). The settings go into the file and a .json sidecar beside it.",
    )
    p.add_argument("prompt", help="the caption")
    _add_model(p)
    given = p.add_mutually_exclusive_group()
    given.add_argument("--image", default=None, help="image to video: the first frame (PNG, JPEG, WebP)")
    given.add_argument("--video", default=None, help="video to video: continue this clip from its last frames")
    given.add_argument("--edit", default=None, metavar="VIDEO",
                       help="edit this clip as the prompt says (the trained (v2v) task); the result replaces it")
    given.add_argument("--last-frame", default=None, metavar="IMAGE",
                       help="a clip that leads into this image (the trained (last) task)")
    given.add_argument("--extend", default=None, metavar="VIDEO",
                       help="continue this clip mid-scene (the trained (extend) task); the result holds it first")
    given.add_argument("--inversion", default=None, metavar="VIDEO",
                       help="edit this clip by exact inversion: its noise under --source-prompt, sampled back "
                            "under the prompt")
    p.add_argument("--source-prompt", default=None, help="with --inversion: the caption of the given clip")
    p.add_argument("--strength", type=float, default=None,
                   help="with --inversion: fresh noise mixed in, 0 (keep all the source's) to 1 (a new sample)")
    p.add_argument("--given-frames", type=int, default=None,
                   help="with --video or --extend: how many of its frames to keep")
    p.add_argument("--given-from", choices=["end", "start"], default=None,
                   help="with --video: keep its last frames and continue it (end, the default), or keep its first "
                        "frames and generate the rest anew (start)")
    p.add_argument("--out", required=True, help="output file: .mp4 for a video, .png for an image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one clip per seed (-seed{S} in the names)")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="sample seeds S..S+N-1, keep the one with the lowest bits/dim under the prompt")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")
    _add_quantization(p)
    p.add_argument("--frames", type=int, default=None, help="pixel frames (past the training length: long video)")
    p.add_argument("--aspect-ratio", default=None, help="e.g. 16:9, 1:1")
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight")
    p.add_argument("--jacobi", action=argparse.BooleanOptionalAction, default=None,
                   help="Jacobi iteration (--no-jacobi: the sequential inverse)")
    p.add_argument("--jacobi-block-size", type=int, default=None)
    p.add_argument("--jacobi-threshold", type=float, default=None)
    p.add_argument("--jacobi-max-iter", type=int, default=None)
    p.add_argument("--no-denoise", dest="denoise", action="store_const", const=False, default=None,
                   help="skip the denoising step")
    p.add_argument("--gradient-denoise", dest="learnable_denoiser", action="store_const", const=False, default=None,
                   help="denoise with the gradient step instead of the learnable denoiser")
    p.add_argument("--denoise-step-size", type=float, default=None, help="the gradient step's size")
    p.add_argument("--target-noise-std", type=float, default=None, help="σ (default: the flow's)")
    p.add_argument("--context-length", type=int, default=None, help="long video: latent frames carried over")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the deep block's KV cache (MLX affine; default: float)")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=None,
                   help="with --kv-bits (default 64, or 32 where 64 does not divide the model's head_dim)")
    p.add_argument("--window", type=int, default=None,
                   help="the deep block's sliding window in latent frames (default: the model's, or the training "
                        "length for a longer clip); the learnable denoiser works in chunks of it")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="denoise and decode each frame while later ones are sampling (the default for a video); "
                        "--no-stream: after sampling, when the KV cache is gone (less memory, the same frames)")
    p.add_argument("--decode-tile-size", type=int, default=None,
                   help="VAE decode in spatial tiles of this many latent pixels (default: whole frames)")
    p.add_argument("--low-memory", action="store_true",
                   help="load each part only for the stages that need it (T5, the flow, the VAE)")
    _add_memory_limit(p, "plan the run before loading and choose settings that fit within GB (decimal gigabytes), "
                         "or refuse with the numbers; default: " + MEMORY_LIMIT_DEFAULT)
    p.set_defaults(func=generate)


@dataclass(frozen=True)
class Sample:
    """One written sample: where, and its record (what ``info`` reads back)."""

    path: Path
    record: dict


def generate(args: argparse.Namespace) -> list[Sample]:
    """``starflow-mlx generate``: every seed's sample (the best of ``--best-of`` each) written with its record."""
    from . import arguments

    best_of = arguments.integer("--best-of", args.best_of, 1, maximum=MAX_BEST_OF)
    settings = {field: getattr(args, option) for option, field in SETTING_OPTIONS.items()
                if getattr(args, option) is not None}
    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".png"):
        raise ValueError(f"--out {out}: the name must end in .mp4 (a video) or .png (an image)")
    _check_given_options(args)
    seeds = [arguments.integer("--seed", seed, 0) for seed in args.seed]
    paths = [_seed_path(out, seed) if len(seeds) > 1 else out for seed in seeds]
    for path in paths:
        _check_free(path, args.overwrite)

    memory_plan = _fit_memory(args, settings)
    pipeline = _load(args, low_memory=memory_plan.request.low_memory)
    memory_record = _apply_memory_plan(pipeline, memory_plan, settings)
    task = _given_task(args, pipeline.video, settings)
    if out.suffix.lower() != _SUFFIX[task]:
        kind = "an image" if task == "t2i" else "a video"
        raise ValueError(f"--out {out}: task {task} makes {kind}, written as {_SUFFIX[task]}")
    condition = _condition(task, args)
    with _options_named():  # every setting checked before the first sample (the library checks again per call)
        pipeline.stream(args.prompt, task, **condition, **settings).close()

    written = []
    for seed, path in zip(seeds, paths):
        if best_of == 1 and task != "t2i":  # the mp4 is written while the clip is generating
            written.append(_write_while_sampling(path, pipeline, args.prompt, task, condition,
                                                 {**settings, "seed": seed}, args.overwrite, memory_record))
        else:  # the best of several is known only once all are done
            result = _best_of(pipeline, args.prompt, task, condition, settings, seed, best_of, memory_record)
            written.append(Sample(_write(path, result, args.overwrite), result.record))
        log.info("wrote %s (%s bits/dim)", path, _bits(written[-1].record))
    return written


MAX_BEST_OF = 64
_SUFFIX = {"t2i": ".png", **{task: ".mp4" for task in ("t2v", "i2v", "v2v", "edit", "last", "extend", "inversion")}}
# generate's options that give an image or a clip, and the task each makes.
GIVEN_OPTIONS = {"image": "i2v", "video": "v2v", "edit": "edit", "last_frame": "last", "extend": "extend",
                 "inversion": "inversion"}


@contextlib.contextmanager
def _options_named():
    """A refused setting named as the option the user typed (``Settings.guidance`` -> ``--cfg``)."""
    try:
        yield
    except ValueError as e:
        message = str(e)
        for option, field in {**SETTING_OPTIONS, **PLAN_OPTIONS}.items():
            for owner in ("Settings", "Request"):
                message = message.replace(f"{owner}.{field} ", f"--{option.replace('_', '-')} ")
        if message == str(e):
            raise
        raise ValueError(message) from None


def _seed_path(out: Path, seed: int) -> Path:
    return out.with_name(f"{out.stem}-seed{seed}{out.suffix}")


def _check_free(path: Path, overwrite: bool) -> None:
    """Refused before minutes of sampling, rather than when writing (which checks again, atomically)."""
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ValueError(f"{path}: exists; pass --overwrite to replace it")


def _add_model(parser: argparse.ArgumentParser) -> None:
    from .hub import DEFAULT_MODEL_HELP

    parser.add_argument("--model", default=None, metavar="PATH_OR_REPO",
                        help=f"pipeline folder, or hub repo id of a converted pipeline ({DEFAULT_MODEL_HELP})")


def _add_quantization(p: argparse.ArgumentParser) -> None:
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the flow and T5 as they load (MLX affine; default: as stored)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=None, help="with --q-bits (default 64)")


def _load(args: argparse.Namespace, low_memory: bool = False):
    from .hub import DEFAULT_MODEL_ID
    from .pipeline import Pipeline

    _check_group_size(args)
    log.info("loading %s", DEFAULT_MODEL_ID if args.model is None else args.model)
    # low_memory (per-stage loading) is passed only when on, so that a pipeline without it loads as before
    extra = {"low_memory": True} if low_memory else {}
    return Pipeline.from_pretrained(args.model, args.dtype, q_bits=args.q_bits, q_group_size=args.q_group_size or 64,
                                    **extra)


def _check_group_size(args: argparse.Namespace) -> None:
    if args.q_group_size is not None and args.q_bits is None:
        raise ValueError("--q-group-size applies to quantizing at load: pass --q-bits 4 or 8 with it")


def _given_task(args: argparse.Namespace, video_model: bool, settings: dict) -> str:
    """The task generate's options ask for: the one of the image or clip given, else t2v (t2i for an image model
    or one frame)."""
    for option, task in GIVEN_OPTIONS.items():
        if getattr(args, option) is not None:
            return task
    return "t2v" if video_model and settings.get("frames") != 1 else "t2i"


def _check_given_options(args: argparse.Namespace) -> None:
    """The options that only go with one kind of given clip."""
    if args.given_frames is not None and args.video is None and args.extend is None:
        raise ValueError("--given-frames goes with --video or --extend")
    if args.given_from is not None and args.video is None:
        raise ValueError("--given-from goes with --video")
    for option in ("source_prompt", "strength"):
        if getattr(args, option) is not None and args.inversion is None:
            raise ValueError(f"--{option.replace('_', '-')} goes with --inversion")
    if args.inversion is not None and args.source_prompt is None:
        raise ValueError("--inversion needs --source-prompt: the caption of the given clip")


def _condition(task: str, args: argparse.Namespace) -> dict:
    """The pipeline's arguments for the image or clip of ``task``."""
    if task in ("i2v", "last"):
        return {"image": args.image if task == "i2v" else args.last_frame}
    if task == "v2v":
        return {"video": args.video, "given_frames": args.given_frames, "given_from": args.given_from or "end"}
    if task == "extend":
        return {"video": args.extend, "given_frames": args.given_frames}
    if task == "edit":
        return {"video": args.edit}
    if task == "inversion":
        return {"video": args.inversion, "source_prompt": args.source_prompt, "strength": args.strength}
    return {}


def _best_of(pipeline, prompt: str, task: str, condition: dict, settings: dict, seed: int, n: int,
             memory_record: dict):
    """Samples of seeds ``seed`` .. ``seed + n - 1``; the one with the lowest bits/dim under the prompt, its record
    holding every candidate's score (its own seed alone regenerates it)."""
    candidates = []
    for candidate_seed in range(seed, seed + n):
        result = _sample(pipeline, prompt, task, condition, {**settings, "seed": candidate_seed}, memory_record)
        candidates.append(result)
        if n > 1:
            log.info("seed %d: %s bits/dim", candidate_seed, _bits(result.record))
    best = min(candidates, key=lambda r: r.record["bits_per_dim"][0])
    if n > 1:
        best.record["best_of"] = {
            "n": n, "seeds": list(range(seed, seed + n)),
            "bits_per_dim": [r.record["bits_per_dim"][0] for r in candidates],
            "kept_seed": best.record["settings"]["seed"],
        }
        log.info("kept seed %d of %d", best.record["settings"]["seed"], n)
    return best


def _sample(pipeline, prompt: str, task: str, condition: dict, settings: dict, memory_record: dict, video=None):
    """One generation, its stages shown as progress bars; closing the stream (Ctrl-C included) cancels it.
    ``video``: a ``media.VideoWriter`` that each frame is appended to as soon as it is decoded; ``memory_record``
    (the memory plan it ran under) goes into the result's record as "memory"."""
    from .pipeline import FramesDecoded, Generated

    progress = _Progress(shallow_blocks=pipeline.flow_config.num_blocks - 1)
    with contextlib.closing(pipeline.stream(prompt, task, **condition, **settings)) as events, progress:
        for event in events:
            progress.update(event)
            if video is not None and isinstance(event, FramesDecoded):
                for frame in event.frames[0]:
                    video.write(frame)
            if isinstance(event, Generated):
                event.result.record["memory"] = dict(memory_record)
                return event.result
    raise RuntimeError("the generation stream ended without a result")


def _write_while_sampling(path: Path, pipeline, prompt: str, task: str, condition: dict, settings: dict,
                          overwrite: bool, memory_record: dict) -> Sample:
    """One clip appended to its mp4 frame by frame while later frames are generating, the record put in at the
    end; nothing is at ``path`` before then, and a failure or Ctrl-C leaves nothing (``VideoWriter`` aborts)."""
    from . import media

    fps = pipeline.settings(**settings).fps
    with media.VideoWriter(path, fps, overwrite=overwrite) as video:
        result = _sample(pipeline, prompt, task, condition, settings, memory_record, video)
        return Sample(video.close(result.record), result.record)


def _write(path: Path, result, overwrite: bool) -> Path:
    """A finished sample written at once: a PNG, or the mp4 of the best of several."""
    from . import media

    frames = result.frames[0]
    if path.suffix.lower() == ".png":
        return media.write_image(path, frames[0], result.record, overwrite=overwrite)
    return media.write_video(path, frames, result.record["settings"]["fps"], result.record, overwrite=overwrite)


def _bits(record: dict) -> str:
    return f"{record['bits_per_dim'][0]:.4f}"


class _Progress:
    """A tqdm bar per stage on stderr, kept when it ends, peak memory in its postfix: text, prefix, then sampling in
    two bars (the deep block over the clip's latent frames, solved first; then the shallow blocks, one by one),
    denoise, decode. When frames stream out while sampling (the shallow blocks finish each frame as the deep block
    has solved it), the deep block's bar stays on and the frames decoded so far show in the postfix."""

    UNITS = {"text": "prompt", "prefix": "clip", "deep": "frame", "shallow": "block", "denoise": "frame",
             "decode": "clip"}

    def __init__(self, shallow_blocks: int):
        self.shallow_blocks = shallow_blocks
        self.deep_block = shallow_blocks  # the last block
        self.bar = self.stage = None
        self.shallow_seen: list[int] = []
        self.streaming = False
        self.frames_out = ""

    def update(self, event) -> None:
        from .pipeline import FramesDecoded, StageFinished, StageStarted
        from .sampler import ChunkSolved, FramesDenoised

        if isinstance(event, StageStarted):
            self._open("deep" if event.stage == "sample" else event.stage, event.total)
            self.stage, self.shallow_seen, self.streaming = event.stage, [], False
        elif self.bar is None:
            return
        elif isinstance(event, FramesDecoded):
            self.frames_out = f", frames out {event.stop}/{event.total}"
            self._advance_to(self.bar.n)
        elif isinstance(event, ChunkSolved):
            if event.block == self.deep_block:
                self._advance_to(self.bar.total * event.stop // event.total)
            elif self.streaming or (not self.shallow_seen and self.bar.n < self.bar.total):
                self.streaming = True  # the shallow blocks finish each frame while the deep block goes on
            elif event.block not in self.shallow_seen:  # a shallow block starts: the one before it is done
                if not self.shallow_seen:
                    self._advance_to(self.bar.total)
                    self._open("shallow", self.shallow_blocks)
                self._advance_to(len(self.shallow_seen))
                self.shallow_seen.append(event.block)
        elif isinstance(event, FramesDenoised) and self.stage == "denoise":
            self._advance_to(event.stop)
        elif isinstance(event, StageFinished):
            self._advance_to(self.bar.total or 1)
            log.debug("%s: %.2f s, peak memory %s", event.stage, event.seconds, _peak_memory())
            self.close()

    def _open(self, name: str, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=f"{name:>7}", unit=self.UNITS.get(name, "step"), file=sys.stderr,
                        leave=True)

    def _advance_to(self, done: int) -> None:
        self.bar.update(max(0, min(done, self.bar.total or done) - self.bar.n))
        self.bar.set_postfix_str(f"peak {_peak_memory()}{self.frames_out}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _peak_memory() -> str:
    import mlx.core as mx

    return f"{mx.get_peak_memory() / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------------------------
# plan, and generate's memory limit
# ----------------------------------------------------------------------------------------------------------------

MEMORY_LIMIT_DEFAULT = ("a safe share of this machine's memory: on a Mac, Metal's recommended working set (about 75%% "
                        "of RAM), elsewhere 75%% of physical memory")
# plan's options -> memory.Request fields (beside SETTING_OPTIONS), for naming a refused value as typed.
PLAN_OPTIONS = {"num_samples": "num_samples", "kv_bits": "kv_bits", "decode_tile_size": "decode_tile_size",
                "window": "window", "q_bits": "q_bits", "q_group_size": "q_group_size", "backend": "backend",
                "task": "task"}
MAX_MEMORY_LIMIT_GB = 1 << 20


def _add_memory_limit(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB", help=text)


def _memory_limit(args: argparse.Namespace, default: bool) -> tuple[int | None, str]:
    """(bytes, where the figure comes from) of --memory-limit; without it the machine's safe share (``default``)
    or None."""
    from . import arguments, memory

    if args.memory_limit is None:
        return memory.default_limit() if default else (None, "")
    gb = arguments.finite_number("--memory-limit", args.memory_limit, positive=True)
    if gb > MAX_MEMORY_LIMIT_GB:
        raise ValueError(f"--memory-limit must be at most {MAX_MEMORY_LIMIT_GB} GB, got {gb:g}")
    return int(gb * memory.GB), "--memory-limit"


def _fit_memory(args: argparse.Namespace, settings: dict):
    """generate's plan, made before any weight is loaded: the settings that fit the memory limit, or a refusal
    (``memory.MemoryLimitError``) with the numbers. What the user set (``settings``, --low-memory) stays."""
    from . import hub, memory

    spec = memory.from_folder(hub.resolve_model(args.model))
    _check_group_size(args)
    task = _given_task(args, spec.video, settings)
    fixed = set(settings) | ({"low_memory"} if args.low_memory else set())
    limit, source = _memory_limit(args, default=True)
    with _options_named():
        request = memory.request_from_settings(
            task, settings, given_frames=args.given_frames, dtype=args.dtype, q_bits=args.q_bits,
            q_group_size=args.q_group_size or 64, low_memory=args.low_memory, backend=memory.default_backend())
        plan = memory.fit(spec, request, limit, fixed)
    log.info("memory plan: peak %s in %s, limit %s (%s)%s", memory.format_bytes(plan.peak), plan.peak_stage,
             memory.format_bytes(limit), source, "".join(f"; {change}" for change in plan.changes))
    return dataclasses.replace(plan, shape={**plan.shape, "limit_bytes": limit})


# The settings fit may choose (memory.fit's steps), applied to the generation's settings.
FITTED_SETTINGS = ("stream_frames", "kv_bits", "decode_tile_size")


def _apply_memory_plan(pipeline, plan, settings: dict) -> dict:
    """The fitted plan's choices applied and logged: its settings (``FITTED_SETTINGS``) into ``settings``, and
    the MLX buffer cache bounded to the headroom under the limit (``pipeline.cache_limit``; ``low_memory`` was
    given to the load). Returns the record's "memory" entry: the predicted peak and its stage, the limit and
    what fit changed."""
    from . import memory

    pipeline.cache_limit = memory.cache_limit(plan, plan.shape["limit_bytes"])
    chosen = {name: getattr(plan.request, name) for name in FITTED_SETTINGS if name not in settings}
    settings.update({name: value for name, value in chosen.items() if value is not None})
    log.info("memory settings: low_memory %s, stream_frames %s, kv_bits %s, decode_tile_size %s, cache limit %s",
             pipeline.low_memory, plan.request.stream_frames, plan.request.kv_bits, plan.request.decode_tile_size,
             memory.format_bytes(pipeline.cache_limit))
    return {"predicted_peak": plan.peak, "peak_stage": plan.peak_stage, "limit": plan.shape["limit_bytes"],
            "changes": list(plan.changes), "backend": plan.request.backend}


def _add_plan(commands) -> None:
    p = commands.add_parser(
        "plan", help="the peak memory a generation will need, stage by stage (no weight is read)",
        description="Predict the peak memory of a generation from the model's config files alone: each stage "
        "(text, prefix, sample, denoise, decode, score) and the terms that make it up. With --memory-limit, the "
        "settings that fit (low memory, frames after sampling, VAE decode tiles, 8- then 4-bit KV cache), or a "
        "refusal with the numbers.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="PATH_OR_REPO",
                        help="pipeline folder, or hub repo id of a converted pipeline (default: the shipped model)")
    source.add_argument("--preset", default=None, choices=["t2v-7b", "t2i-3b"],
                        help="a released model, without its weights: STARFlow-V 7B T2V or STARFlow 3B T2I")
    p.add_argument("--task", default=None,
                   help="t2v, t2i, i2v, v2v, edit, last, extend or inversion (default: the model's)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--aspect-ratio", default=None)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight (0: none)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--jacobi-block-size", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="the weights' dtype (default: as stored)")
    p.add_argument("--q-bits", type=int, default=None, help="4 or 8: quantized weights")
    p.add_argument("--q-group-size", type=int, default=None)
    p.add_argument("--kv-bits", type=int, default=None, help="4 or 8: the deep block's quantized KV cache")
    p.add_argument("--window", type=int, default=None, help="the deep block's sliding window (latent frames)")
    p.add_argument("--decode-tile-size", type=int, default=None, help="VAE decode tiles (latent pixels)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="frames denoised and decoded while sampling (default) or after it (--no-stream)")
    p.add_argument("--low-memory", action="store_true", help="load each part only for the stages that need it")
    p.add_argument("--backend", default=None, help="cpu or gpu (default: this machine's)")
    _add_memory_limit(p, "choose settings that fit within GB (decimal gigabytes), or refuse")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=plan)


def plan(args: argparse.Namespace) -> dict:
    """``starflow-mlx plan``: the stage table and its explanation; with a limit, the fitted plan or the refusal."""
    from . import hub, memory

    _check_group_size(args)
    spec = memory.preset(args.preset) if args.preset else memory.from_folder(hub.resolve_model(args.model))
    settings = {field: getattr(args, option) for option, field in SETTING_OPTIONS.items()
                if getattr(args, option, None) is not None}
    task = args.task or spec.pipeline.task
    limit, _ = _memory_limit(args, default=False)
    with _options_named():
        request = memory.request_from_settings(
            task, settings, num_samples=args.num_samples, dtype=args.dtype, q_bits=args.q_bits,
            q_group_size=args.q_group_size or 64, low_memory=args.low_memory,
            backend=args.backend or memory.default_backend())
        fixed = set(settings) | ({"low_memory"} if args.low_memory else set())
        result = memory.plan(spec, request) if limit is None else memory.fit(spec, request, limit, fixed)
    description = {**result.to_dict(), "limit_bytes": limit}
    if args.json:
        _print(json.dumps(description, indent=2))
        return description
    lines = result.explain()
    if limit is not None:
        lines.append(f"  fits within the limit of {memory.format_bytes(limit)}")
    _print("\n".join(lines))
    return description


# ----------------------------------------------------------------------------------------------------------------
# helper
# ----------------------------------------------------------------------------------------------------------------


def _add_helper(commands) -> None:
    p = commands.add_parser(
        "helper", help="serve an app over stdin/stdout: JSON lines (hello, load, plan, generate, score, cancel, ...)",
        description="A long-lived process for apps: one JSON request per line on stdin, one JSON event per line on "
        "stdout, logs on stderr. The protocol is in starflow_mlx/helper.py and its schema in "
        "starflow_mlx/schema/helper.schema.json.",
    )
    p.set_defaults(func=helper)


def helper(args: argparse.Namespace) -> int:
    """``starflow-mlx helper``: serve until EOF on stdin or a ``shutdown`` request."""
    from . import helper as helper_process

    return helper_process.main([])


# ----------------------------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------------------------

SCORE_NOTE = ("bits/dim of the VAE latent with the model's σ noise added (seeded): the likelihood of the noisy "
              "latent the flow models; lower is more likely")


def _add_score(commands) -> None:
    p = commands.add_parser(
        "score", help="bits/dim of a clip or image under each caption (lower: more likely)",
        description="Encode MEDIA with the VAE, add the model's σ noise (fixed by --seed) and print the flow's "
        "exact negative log-likelihood in bits/dim under each caption. " + SCORE_NOTE + ".",
    )
    p.add_argument("media", help="image (PNG, JPEG, WebP) or video")
    p.add_argument("captions", nargs="+", metavar="caption")
    _add_model(p)
    p.add_argument("--seed", type=int, default=0, help="the VAE posterior and σ noise")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    _add_quantization(p)
    p.add_argument("--frames", type=int, default=None, help="frames of a video scored (default: the folder's)")
    p.add_argument("--fps", type=int, default=None, help="the rate the video is read at (default: the folder's)")
    p.add_argument("--aspect-ratio", default=None)
    p.add_argument("--target-noise-std", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=score)


def score(args: argparse.Namespace) -> dict:
    """``starflow-mlx score``: one line per caption (bits/dim, caption) and the note, or the record as JSON."""
    settings = {option: getattr(args, option) for option in ("frames", "fps", "aspect_ratio", "target_noise_std")
                if getattr(args, option) is not None}
    if not Path(args.media).is_file():
        raise ValueError(f"{args.media}: no such file")
    pipeline = _load(args)
    with _options_named():
        likelihood = pipeline.log_likelihood(args.media, list(args.captions), seed=args.seed, **settings)
    record = {"media": str(args.media), **likelihood.record}
    if args.json:
        _print(json.dumps(record, indent=2, ensure_ascii=False))
        return record
    for caption, bits in zip(record["captions"], record["bits_per_dim"]):
        _print(f"{bits:.4f}  {caption}")
    _print(f"({SCORE_NOTE})")
    return record


# ----------------------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------------------

INFO_FIELDS = ("task", "prompt", "size", "frames", "noise_std", "bits_per_dim", "given_frames", "version")


def _add_info(commands) -> None:
    p = commands.add_parser(
        "info", help="the settings a generated mp4 / PNG was made with, or what a model is",
        description="Print the record stored in a file written by generate (or its sidecar); without a file, describe "
        "a model (--model, or the one shipped with starflow-mlx) from its config files: task defaults, sizes, parts "
        "and provenance.",
    )
    p.add_argument("file", nargs="?", default=None, help="mp4, PNG, or its .json sidecar")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="the whole record as JSON")
    p.set_defaults(func=info)


def info(args: argparse.Namespace) -> dict:
    from . import media

    if args.file is None:
        return model_info(args)
    if args.model is not None:
        raise ValueError("info takes a FILE or --model, not both")
    record = media.read_metadata(args.file)
    if args.json:
        _print(json.dumps(record, indent=2, ensure_ascii=False))
        return record
    lines = [f"{name}: {_short(record[name])}" for name in INFO_FIELDS if name in record]
    if "settings" in record:
        lines.append("settings:")
        lines += [f"  {name}: {_short(value)}" for name, value in record["settings"].items()]
    if isinstance(record.get("model"), dict):
        model = record["model"]
        named = "".join(f", {key} {_short(model[key])}" for key in ("name", "version") if key in model)
        lines.append(f"model: {_short(model.get('id'))}{named}")
    if isinstance(record.get("memory"), dict):
        lines.append(_memory_line(record["memory"]))
    if "timings" in record:
        lines.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in record["timings"].items()))
    if "best_of" in record:
        best = record["best_of"]
        lines.append(f"best of {best['n']}: kept seed {best['kept_seed']}; bits/dim "
                     + ", ".join(f"{b:.4f}" for b in best["bits_per_dim"]))
    _print("\n".join(lines))
    return record


def _memory_line(entry: dict) -> str:
    """A record's "memory" entry (generate's plan) in one line; values not of the expected kind shown as they are."""
    from . import memory

    def size(key):
        value = entry.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62
        return memory.format_bytes(value) if ok else _short(value)

    changes = entry.get("changes")
    changed = "; ".join(map(_short, changes)) if isinstance(changes, list) and changes else "nothing"
    return (f"memory: predicted peak {size('predicted_peak')} in {_short(entry.get('peak_stage'))}, limit "
            f"{size('limit')}; changed: {changed}")


def model_info(args: argparse.Namespace) -> dict:
    """``starflow-mlx info [--model M]``: a model described from its config files (``hub.describe``), no weight
    read."""
    from . import hub

    description = {"model": hub.DEFAULT_MODEL_ID if args.model is None else args.model,
                   **hub.describe(hub.read_pipeline_folder(hub.resolve_model(args.model)))}
    if args.json:
        _print(json.dumps(description, indent=2, ensure_ascii=False))
        return description
    flow, parts = description["flow"], description["parts"]
    lines = [f"{name}: {_short(description[name])}" for name in ("model", "folder", "name", "version", "task")
             if name in description]
    size = flow["latent_size"]
    lines.append(f"flow: {flow['parameters']:,} parameters in {flow['blocks']} blocks; latent "
                 f"{flow['latent_channels']} x {size} x {size}; text {flow['text_tokens']} tokens of "
                 f"{flow['text_width']}")
    for name, part in parts.items():
        quantization = part["quantization"] if isinstance(part["quantization"], dict) else {}
        bits = f", {_short(quantization['bits'])}-bit" if "bits" in quantization else ""
        lines.append(f"{name}: {part['model_type']}, {_short(part['dtype'])}{bits}")
    lines.append("defaults:")
    lines += [f"  {name}: {_short(value)}" for name, value in description["defaults"].items()]
    if description["provenance"]:
        lines.append("provenance:")
        lines += [f"  {name}: {_short(value)}" for name, value in description["provenance"].items()]
    _print("\n".join(lines))
    return description


def _short(value) -> str:
    """One line of a record's value for a terminal: control characters (a file's text may hold newlines or escape
    sequences) shown escaped, long values cut."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= 200 else text[:197] + "..."


def _print(text: str) -> None:
    """Results, on stdout (messages go to stderr through logging)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
