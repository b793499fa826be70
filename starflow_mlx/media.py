"""Media in and out: conditioning images and videos read the way the official code reads them, and mp4 / PNG
samples written atomically with their settings inside the file and in a ``.json`` sidecar beside it.

Reading (inputs of image-to-video and video-to-video):

- ``bucket_size(aspect_ratio, base_size, multiple)``: the (H, W) of an aspect-ratio bucket, the official
  ``dataset.aspect_ratio_to_image_size`` (area ``base_size²``, each side rounded to the nearest ``multiple``, Python's
  round-half-to-even). ``sample.py`` calls it with ``base_size = img_size`` (pixels, e.g. 640) and
  ``multiple = VAE spatial factor × patch_size`` (16 for STARFlow-V).
- ``read_image(path, size)`` / ``prepare_image(image, size)``: ``sample.py``'s ``prepare_input_image``: scale by
  ``max(H / h, W / w)``, resize to ``(int(h·scale), int(w·scale))`` with Pillow's BILINEAR (what torchvision's
  ``Resize`` does to a PIL image; it smooths when shrinking), centre-crop to (H, W) with torchvision's offsets
  (``int(round((h' - H) / 2))``), then ``ToTensor`` + ``Normalize(0.5, 0.5)``: float32 (3, H, W) in [-1, 1], the
  channels-first layout the VAEs take. Two deliberate differences: a side that floating point leaves one pixel short
  of the target (``int(22 · 480 / 22) = 479``) is kept at the target, where torchvision would pad a black line; and
  the image is first turned upright by its EXIF orientation and made RGB on purpose (``_rgb``) instead of by a bare
  ``convert("RGB")``, which drops alpha (revealing whatever colour transparent pixels store) and saturates 16-bit
  grey at 255.
- ``read_video(path, size, frames, fps=..., from_end=...)``: ``frames`` frames from the start, or the last ones
  (continuation), each frame resized and cropped as an image. Frames are picked as the official training loader
  (``dataset.sample_clip``) picks them: at the source rate when ``fps`` is None or not below it (no frame is ever
  repeated to raise the rate), else every ``step = source fps / fps`` frames, frame ``round(start + i·step)``
  (numpy's rounding); ``start`` is 0, or the position that makes the last pick the last frame. A video with too few
  frames is an error (the official loader stretches it with repeated frames, which would change the motion a
  continuation follows). A stream's display rotation (phone videos) is applied.
- ``probe_media(path)``: kind, size, frame count (decoded, not the container's claim) and fps of an image or video.

Writing (samples):

- ``VideoWriter`` (frame by frame, as the sampler streams them) and ``write_video`` (all at once, through it):
  H.264 (libx264, yuv420p, BT.709 limited range, tagged so players show the colours we meant), ``crf`` 10 and
  preset "slow" as the official sampler's grid videos; odd widths/heights (which yuv420p cannot hold) are padded to
  even by repeating the last column/row, so no generated pixel is lost. ``write_image``: PNG.
- Frames are (T, H, W, 3) (an image (H, W, 3)): uint8 as they are, or floats in [-1, 1] converted by ``to_uint8``,
  clipped and rounded as the official ``save_image`` does (``x·255 + 0.5``, truncated; the official videos
  truncate without the ``+ 0.5``, a bias of half a level that we do not copy).
- The settings (any JSON object, ``metadata``) go into the file, as ``{"starflow-mlx": metadata}`` compact JSON in
  the mp4's ``comment`` tag or the PNG's ``starflow-mlx`` iTXt chunk, and into ``<file>.json`` beside it (e.g.
  ``clip.mp4.json``). Both are written to hidden ``.<name>.tmp-<pid>-<random>`` files in the same folder, marked
  as ours and locked while this process lives, and renamed into place at the end (``staging.StagedFiles``): an
  error, Ctrl-C or SIGTERM leaves no partial file, and what a killed run left (proved ours by its marker) is removed
  by the next write to the same name. An existing file is replaced only with ``overwrite``; a folder or a symbolic
  link is never a target.
- ``read_metadata(path)``: the settings back, from the mp4, the PNG or the sidecar.
- ``check_sample(values, stage)``: NaN/inf, or a sample collapsed to a constant, is an error naming the stage and
  the fix, so that a broken run never writes a black video.

Every problem with a file is a ``MediaError`` (a ``ValueError``), one line starting with the file's path. Untrusted
files are bounded before decoding: Pillow opens only PNG, JPEG and WebP, and an image or video frame larger than
``MAX_PIXELS`` is refused from its header, before its pixels are decoded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Optional

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image, ImageOps, PngImagePlugin

from . import arguments
from .config import MAX_JSON_BYTES, parse_json_object, read_json_object
from .staging import StagedFiles

# The official --aspect_ratio choices ("random" aside, which picks one of these).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# 8192 x 8192: above 8K video (7680 x 4320); a frame this size takes 192 MiB as RGB bytes.
MAX_PIXELS = 8192 * 8192
# Below one latent pixel of the Wan VAE (16 pixels) an image holds nothing a video could be conditioned on: such a
# file is a thumbnail or the wrong file, and scaling it 30 times up would condition the model on a blur.
MIN_SIDE = 16
# Over two hours at 30 fps; bounds the decoding loop of a crafted stream of countless tiny frames.
MAX_VIDEO_FRAMES = 1 << 18
MAX_FPS = 240
DEFAULT_CRF = 10
DEFAULT_PRESET = "slow"
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)
METADATA_KEY = "starflow-mlx"
MP4_TAG = "comment"
SIDECAR_SUFFIX = ".json"

# How NaN/inf or a flat sample usually comes about, and what to do about it.
PRECISION_FIX = "run in float32 (dtype float32), or with 8-bit rather than 4-bit weights (q_bits 8)"


class MediaError(ValueError):
    """An image or video that cannot be read or written, or lacks our metadata; one line naming the file."""


# ----------------------------------------------------------------------------------------------------------------
# Sizes and values
# ----------------------------------------------------------------------------------------------------------------


def bucket_size(aspect_ratio: Optional[str], base_size: int, multiple: int) -> tuple[int, int]:
    """(H, W) of ``aspect_ratio`` ("16:9", ...; None: the square of a model trained without ``mix_aspect``) for an
    area of ``base_size²`` pixels, each side the nearest multiple of ``multiple``
    (``dataset.aspect_ratio_to_image_size``)."""
    base_size = arguments.integer("base_size", base_size, 1)
    multiple = arguments.integer("multiple", multiple, 1)
    if aspect_ratio is None:
        return base_size, base_size
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}; got {aspect_ratio!r:.40}")
    ratio_w, ratio_h = map(int, aspect_ratio.split(":"))
    ratio = ratio_w / ratio_h
    height = int(round(math.sqrt(base_size**2 / ratio) / multiple)) * multiple
    width = int(round(math.sqrt(base_size**2 * ratio) / multiple)) * multiple
    if not height or not width:
        raise ValueError(
            f"base_size {base_size} is too small for aspect ratio {aspect_ratio} in multiples of {multiple} "
            f"(a side rounds to 0)"
        )
    return height, width


def to_pixels(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1], as torchvision's ``ToTensor`` then
    ``Normalize(0.5, 0.5)`` compute it (same float32 operations, so the same bits)."""
    values = (rgb.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(np.moveaxis(values, -1, -3))


def to_uint8(frames: Any) -> np.ndarray:
    """Frames (..., H, W, 3) as uint8: uint8 kept, floats in [-1, 1] clipped and rounded as the official
    ``save_image`` (``(x + 1) / 2 · 255 + 0.5``, truncated); NaN/inf is an error (it would become black)."""
    values = np.asarray(frames)
    if values.ndim < 3 or values.shape[-1] != 3:
        raise ValueError(f"frames must be (..., H, W, 3) RGB, got shape {list(values.shape)}")
    if values.dtype == np.uint8:
        return values
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"frames must be uint8, or floating point in [-1, 1]; got dtype {values.dtype}")
    _check_finite(values, "frames to write")
    unit = (np.clip(values.astype(np.float32), -1, 1) + 1) * np.float32(0.5)
    return np.clip(unit * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)


def check_sample(values: Any, stage: str, value_range: Optional[tuple[float, float]] = None) -> None:
    """Refuse a sample that holds NaN/inf, or that collapsed to one value (after clipping to ``value_range``, e.g.
    (-1, 1) for pixels, where a decode saturated everywhere is as flat as a black one), naming ``stage`` (e.g.
    "deep block", "decode") and the usual fix, so that a failed run is never written out as a flat video."""
    values = np.asarray(values)
    _check_finite(values, stage)
    if value_range is not None:
        values = np.clip(values, *value_range)
    if values.size and values.min() == values.max():
        raise ValueError(
            f"{stage}: the sample collapsed to the constant {values.flat[0]:.6g} (all {values.size} values); "
            f"reduced precision has usually lost it: {PRECISION_FIX}"
        )


def _check_finite(values: np.ndarray, stage: str) -> None:
    if np.issubdtype(values.dtype, np.inexact):
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(
                f"{stage}: the sample holds NaN or inf ({bad} of {values.size} values); it overflowed in reduced "
                f"precision: {PRECISION_FIX}"
            )


def _check_size(size: Any) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r:.60}")
    height, width = (arguments.integer(name, value, 1) for name, value in zip(("height", "width"), size))
    if height * width > MAX_PIXELS:
        raise ValueError(f"size {height}x{width} is above the {MAX_PIXELS:,}-pixel limit")
    return height, width


# ----------------------------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """An exception's message on one line: the OS's words for an OSError, else its text."""
    strerror = getattr(error, "strerror", None)
    return " ".join((strerror if isinstance(strerror, str) else str(error) or type(error).__name__).split())


@contextlib.contextmanager
def _reading(path: Path, kind: str):
    """Any failure of the decoders on ``path`` as one ``MediaError`` line: Pillow and FFmpeg raise a zoo of types
    (OSError, SyntaxError, EOFError, zlib and struct errors, FFmpegError) for files they cannot parse."""
    try:
        yield
    except (MediaError, MemoryError):
        raise
    except Exception as e:
        raise MediaError(f"{path}: cannot read this {kind}: {_reason(e)}") from None


def _check_file(path: Path) -> None:
    try:
        is_file, is_dir, exists = path.is_file(), path.is_dir(), path.exists()
        empty = is_file and path.stat().st_size == 0
    except OSError as e:
        raise MediaError(f"{path}: cannot read: {_reason(e)}") from None
    if not is_file:
        problem = "is a folder, expected a file" if is_dir else "not a regular file" if exists else "no such file"
        raise MediaError(f"{path}: {problem}")
    if empty:
        raise MediaError(f"{path}: is empty")


def _check_dimensions(path: Path, width: int, height: int, kind: str) -> None:
    """Bound the pixels decoded, from the header, before any is."""
    if width * height > MAX_PIXELS:
        raise MediaError(
            f"{path}: the {kind} is {width}x{height}, above the {MAX_PIXELS:,}-pixel limit; scale it down first"
        )


def _check_conditioning_size(path: Path, width: int, height: int, kind: str) -> None:
    if min(width, height) < MIN_SIDE:
        raise MediaError(
            f"{path}: the {kind} is {width}x{height}; at least {MIN_SIDE} pixels a side are needed to condition on"
        )


def _open_image(path: Path) -> Image.Image:
    """``path`` opened (header only) as PNG, JPEG or WebP, its size checked before any pixel is decoded."""
    _check_file(path)
    with _reading(path, "image"):
        with warnings.catch_warnings():  # Pillow warns of a decompression bomb below our own, lower, limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(path, formats=IMAGE_FORMATS)
            except Image.UnidentifiedImageError:
                raise MediaError(f"{path}: not an image in a format read here ({', '.join(IMAGE_FORMATS)})") from None
        _check_dimensions(path, image.width, image.height, "image")
        return image


def read_image(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """The image at ``path`` (PNG, JPEG, WebP) resized and centre-cropped to ``size`` (H, W): float32 (3, H, W) in
    [-1, 1] (see the module docstring for the exact transform)."""
    path = Path(path)
    size = _check_size(size)
    with _open_image(path) as image, _reading(path, "image"):
        _check_conditioning_size(path, image.width, image.height, "image")
        return prepare_image(ImageOps.exif_transpose(image), size)


def prepare_image(image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An image (a PIL image of any mode, made RGB by ``_rgb``; or uint8 (h, w, 3)) resized and centre-cropped to
    ``size`` (H, W) as ``sample.py``'s ``prepare_input_image``: float32 (3, H, W) in [-1, 1]."""
    image = Image.fromarray(to_uint8(image)) if isinstance(image, np.ndarray) else _rgb(image)
    return to_pixels(np.asarray(resize_crop(image, _check_size(size))))


def resize_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An RGB ``image`` scaled to cover ``size`` (H, W) with Pillow's BILINEAR and centre-cropped to it, as
    torchvision's ``Resize`` and ``CenterCrop`` do in ``prepare_input_image``."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    # Floating point can leave the binding side a pixel short (int(22 * (480 / 22)) == 479): keep it at the target.
    resized_h, resized_w = max(height, int(image.height * scale)), max(width, int(image.width * scale))
    image = image.resize((resized_w, resized_h), Image.BILINEAR)
    top, left = int(round((resized_h - height) / 2.0)), int(round((resized_w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _rgb(image: Image.Image) -> Image.Image:
    """Any mode as 8-bit RGB on purpose: 16-bit grey scaled (not saturated at 255) and transparency composited over
    white, what a viewer shows (``convert("RGB")`` would show whatever colour transparent pixels happen to store)."""
    if image.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" holding 0..65535)
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# Reading videos
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """Frames read from a video file (``read_video``).

    ``frames``: float32 (T, 3, H, W) in [-1, 1]; ``indices``: the source frames they are (0-based, decode order);
    ``fps``: their rate (the source's divided by the step between picks); ``source_fps`` / ``source_frames``: the
    file's rate and, when it was counted (``from_end``), its frame count (else None).
    """

    frames: np.ndarray
    indices: list[int]
    fps: Optional[float]
    source_fps: Optional[float]
    source_frames: Optional[int]


@dataclass
class MediaInfo:
    """What ``probe_media`` finds: ``kind`` "image" or "video", size, frames (1 for an image; a video's frames
    decoded, not its header's claim) and fps (None for an image or a stream without a rate)."""

    kind: str
    width: int
    height: int
    frames: int
    fps: Optional[float]


@contextlib.contextmanager
def _open_video(path: Path) -> Iterator[av.container.InputContainer]:
    """``path`` opened with its first video stream's size checked before any frame is decoded."""
    _check_file(path)
    with _reading(path, "video"):
        container = av.open(str(path))
        try:
            if not container.streams.video:
                raise MediaError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            _check_dimensions(path, stream.codec_context.width, stream.codec_context.height, "video")
            yield container
        finally:
            container.close()


def _decoded(path: Path, container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """The frames of the first video stream, each one's size checked (a stream may change size midway)."""
    for count, frame in enumerate(container.decode(video=0)):
        if count >= MAX_VIDEO_FRAMES:
            raise MediaError(f"{path}: has more than {MAX_VIDEO_FRAMES:,} frames, the limit read here")
        _check_dimensions(path, frame.width, frame.height, "video")
        yield frame


def _source_fps(container: av.container.InputContainer) -> Optional[float]:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate and math.isfinite(rate) and rate > 0 else None


def _count_frames(path: Path) -> int:
    with _open_video(path) as container, _reading(path, "video"):
        return sum(1 for _ in _decoded(path, container))


def probe_media(path: str | os.PathLike) -> MediaInfo:
    """Kind, size, frame count and fps of an image (PNG, JPEG, WebP) or a video (any container FFmpeg reads)."""
    path = Path(path)
    if _looks_like_image(path):
        with _open_image(path) as image:
            return MediaInfo("image", image.width, image.height, 1, None)
    frames = _count_frames(path)
    with _open_video(path) as container:
        stream = container.streams.video[0]
        return MediaInfo("video", stream.codec_context.width, stream.codec_context.height, frames,
                         _source_fps(container))


def _looks_like_image(path: Path) -> bool:
    """PNG, JPEG or WebP by their signatures; anything else is left to FFmpeg."""
    _check_file(path)
    with _reading(path, "file"), open(path, "rb") as f:
        head = f.read(12)
    return head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (head[:4], head[8:]) == (b"RIFF", b"WEBP")


def frame_step(source_fps: Optional[float], fps: Optional[float], frames: int) -> float:
    """Source frames between two picks, as ``dataset.sample_clip`` computes it: 1 when ``fps`` is None or not below
    the source's (never repeat frames), else the span of ``frames`` frames at ``fps`` in source frames, per gap."""
    if fps is None or source_fps is None or fps >= source_fps or frames == 1:
        return 1.0
    span = (frames - 1) / fps * source_fps
    return max(span / (frames - 1), 1.0)


def frame_indices(frames: int, step: float, total: Optional[int] = None) -> list[int]:
    """The source frames picked: ``round(start + i·step)`` (numpy's rounding), ``start`` 0, or with ``total`` the
    source's frame count, ``total - 1 - step·(frames - 1)`` so that the last pick is the last frame."""
    start = 0.0 if total is None else total - 1 - step * (frames - 1)
    return [int(np.round(start + i * step)) for i in range(frames)]


def read_video(
    path: str | os.PathLike, size: tuple[int, int], frames: int, *, fps: Optional[float] = None,
    from_end: bool = False,
) -> VideoClip:
    """``frames`` frames of the video at ``path`` (the first ones, or the last ones with ``from_end``), at its own
    rate or, with ``fps`` below it, picked every ``source fps / fps`` frames; each resized and centre-cropped to
    ``size`` (H, W) as ``prepare_image``. A video with fewer frames is an error saying how many it has. The last
    frames are found by decoding the file twice (once to count), so memory holds only the frames returned."""
    path = Path(path)
    size = _check_size(size)
    frames = arguments.integer("frames", frames, 1)
    fps = None if fps is None else arguments.finite_number("fps", fps, positive=True)
    arguments.flag("from_end", from_end)
    total = _count_frames(path) if from_end else None
    with _open_video(path) as container, _reading(path, "video"):
        stream = container.streams.video[0]
        _check_conditioning_size(path, stream.codec_context.width, stream.codec_context.height, "video")
        source_fps = _source_fps(container)
        if fps is not None and source_fps is None:
            raise MediaError(f"{path}: the video has no frame rate to resample from; read it at its own (fps=None)")
        step = frame_step(source_fps, fps, frames)
        indices = frame_indices(frames, step, total)
        if indices[0] < 0:
            raise _too_short(path, total, indices, fps, step)
        picked, seen = _pick_frames(path, container, set(indices), size)
        if len(picked) < len(set(indices)):
            raise _too_short(path, seen, indices, fps, step)
    rgb = np.stack([picked[i] for i in indices])
    return VideoClip(to_pixels(rgb), indices, None if source_fps is None else source_fps / step, source_fps, total)


def _pick_frames(path: Path, container, wanted: set[int], size: tuple[int, int]) -> tuple[dict[int, np.ndarray], int]:
    """The ``wanted`` frames by index, resized and cropped, uint8 (H, W, 3), decoding no further than the last one;
    and the number of frames decoded."""
    picked, last, seen = {}, max(wanted), 0
    for index, frame in enumerate(_decoded(path, container)):
        seen = index + 1
        if index in wanted:
            rgb = np.rot90(frame.to_ndarray(format="rgb24"), k=round((frame.rotation or 0) / 90) % 4)
            picked[index] = np.asarray(resize_crop(Image.fromarray(np.ascontiguousarray(rgb)), size))
        if index == last:
            break
    return picked, seen


def _too_short(path: Path, frames_in_video: int, indices: list[int], fps: Optional[float], step: float) -> MediaError:
    if not frames_in_video:
        return MediaError(f"{path}: the video has no frames")
    rate = f" at {fps:g} fps (one every {step:.3g} frames)" if step > 1 else ""
    return MediaError(
        f"{path}: the video has {frames_in_video} frames; {len(indices)} frames{rate} span "
        f"{indices[-1] - indices[0] + 1}; ask for fewer frames" + (" or a higher fps" if step > 1 else "")
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    """The ``.json`` beside a written file: ``clip.mp4`` -> ``clip.mp4.json`` (never the name of a media file)."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _metadata_texts(metadata: Optional[dict]) -> tuple[str, str]:
    """``{"starflow-mlx": metadata}`` as compact JSON (for the file's tag) and indented (for the sidecar), each
    within what ``read_metadata`` reads back."""
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    wrapped = {METADATA_KEY: metadata}
    try:
        compact = json.dumps(wrapped, allow_nan=False, ensure_ascii=False, separators=(",", ":"), default=_json_value)
        pretty = json.dumps(wrapped, allow_nan=False, ensure_ascii=False, indent=2, default=_json_value) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"metadata cannot be stored as JSON: {e}") from None
    if len(pretty.encode()) > MAX_JSON_BYTES:
        raise ValueError(f"metadata takes {len(pretty.encode()):,} bytes as JSON, above the {MAX_JSON_BYTES:,} limit")
    return compact, pretty


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):  # numpy scalars, e.g. a seed or a timing
        return value.item()
    raise TypeError(f"a {type(value).__name__} is not a JSON value (numbers, strings, booleans, None, lists, dicts)")


def _output_path(path: str | os.PathLike, suffix: str) -> Path:
    path = Path(path).absolute()
    if path.suffix.lower() != suffix:
        raise MediaError(f"{path}: expected a file name ending in {suffix}")
    return path


def _staged(target: Path, overwrite: bool, drafts: int = 0) -> StagedFiles:
    """Hidden temporaries for ``target`` and its sidecar (``paths[0]`` and ``paths[1]``), then ``drafts`` more,
    renamed onto them together by ``_put_in_place`` (``staging.StagedFiles``). Only an existing regular file is
    replaced, and only with ``overwrite``; a target another run is writing is refused. Every problem is a
    ``MediaError`` naming ``target``."""
    try:
        return StagedFiles((target, sidecar_path(target)), overwrite, MediaError, drafts)
    except OSError as e:
        raise MediaError(f"{target}: cannot write: {_reason(e)}") from None


def _put_in_place(output: StagedFiles, sidecar_text: str) -> None:
    output.paths[1].write_text(sidecar_text, encoding="utf-8")
    output.put_in_place()


@contextlib.contextmanager
def _writing(target: Path, output: StagedFiles):
    """Any failure while ``output`` is written discards it; an OS-level one (full disk, read-only, FFmpeg's) becomes
    one line naming ``target``."""
    try:
        yield
    except BaseException as e:
        output.discard()
        if isinstance(e, (OSError, av.FFmpegError)):
            raise MediaError(f"{target}: cannot write: {_reason(e)}") from None
        raise


def _frame_rate(fps: Any) -> Fraction:
    fps = arguments.finite_number("fps", fps, positive=True)
    if fps > MAX_FPS:
        raise ValueError(f"fps must be at most {MAX_FPS}, got {fps:g}")
    return Fraction(fps).limit_denominator(1001)  # NTSC's 24000/1001 given as a float comes back exact


def _even(rgb: np.ndarray) -> np.ndarray:
    """yuv420p holds even sizes only: an odd last column/row is repeated, so no generated pixel is cropped."""
    height, width = rgb.shape[:2]
    if height % 2 or width % 2:
        rgb = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return rgb


class VideoWriter:
    """An H.264 mp4 written frame by frame, atomically: nothing appears at ``path`` before ``close``.

    ``with VideoWriter(path, fps, metadata) as video: video.write(frame)`` for each (H, W, 3) frame (uint8, or
    floats in [-1, 1]); leaving the block closes it, or on an exception (Ctrl-C included) aborts it, leaving no
    file. Any failure inside ``write`` or ``close`` aborts it too. ``close(metadata)`` may replace the metadata given
    here (timings are known only at the end). See the module docstring for the encoding and the metadata.

    Frames are encoded into a hidden draft beside ``path``; ``close`` copies its packets (no re-encoding) into the
    final file with the metadata, since FFmpeg fixes a file's tags when it writes the header, at the first packet.
    """

    def __init__(
        self, path: str | os.PathLike, fps: float, metadata: Optional[dict] = None, *, overwrite: bool = False,
        crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET,
    ):
        self.path = _output_path(path, ".mp4")
        self.rate = _frame_rate(fps)
        self.crf = arguments.integer("crf", crf, 0)
        if self.crf > 51:
            raise ValueError(f"crf must be in [0, 51] (libx264; lower is better), got {self.crf}")
        if preset not in X264_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}; got {preset!r:.40}")
        self.preset = preset
        _metadata_texts(metadata)
        self.metadata = metadata
        self.frames_written = 0
        self._size = None  # (H, W, 3) of the first frame
        self._output = _staged(self.path, arguments.flag("overwrite", overwrite), drafts=1)
        self._draft = self._output.paths[2]  # the frames as encoded, before the metadata
        with _writing(self.path, self._output):
            self._container = av.open(str(self._draft), "w", format="mp4")

    def write(self, frame: Any) -> None:
        with self._aborting_on_failure():
            rgb = to_uint8(frame)
            if self._size is None:
                if rgb.ndim != 3:
                    raise ValueError(f"a frame must be (H, W, 3), got shape {list(rgb.shape)}")
                self._stream = self._add_stream(*_even(rgb).shape[:2])
                self._size = rgb.shape
            elif rgb.shape != self._size:
                raise ValueError(
                    f"every frame must have the first one's shape {list(self._size)}, got {list(rgb.shape)}"
                )
            self._encode(_even(rgb))
            self.frames_written += 1

    def close(self, metadata: Optional[dict] = None) -> Path:
        """Finish the file and put it and its sidecar in place; returns the file's absolute path."""
        with self._aborting_on_failure():
            if not self.frames_written:
                raise MediaError(f"{self.path}: no frame was written, so there is no video to save")
            compact, pretty = _metadata_texts(self.metadata if metadata is None else metadata)
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            _copy_video(self._draft, self._output.paths[0], {MP4_TAG: compact})
            _put_in_place(self._output, pretty)
        self._output = None
        return self.path

    def abort(self) -> None:
        """Stop and remove everything written so far; nothing appears at ``path``."""
        if self._output is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._output.discard()
            self._output = None

    @contextlib.contextmanager
    def _aborting_on_failure(self):
        if self._output is None:
            raise ValueError(f"{self.path}: the writer is closed")
        try:
            with _writing(self.path, self._output):
                yield
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.abort()
        elif self._output is not None:  # not closed inside the block already
            self.close()

    def _add_stream(self, height: int, width: int):
        stream = self._container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        context = stream.codec_context  # tagged BT.709 limited range, the conversion _encode does
        context.colorspace, context.color_range = Colorspace.ITU709, ColorRange.MPEG
        context.color_primaries = context.color_trc = 1  # BT.709
        return stream

    def _encode(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
            format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
        )
        frame.pts = self.frames_written
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


def _copy_video(source: Path, destination: Path, tags: dict[str, str]) -> None:
    """The video stream of ``source`` copied packet by packet into a new mp4 ``destination`` carrying ``tags``, its
    index at the front (faststart) so that players start before the whole file has arrived."""
    with av.open(str(source)) as draft, av.open(
        str(destination), "w", format="mp4", options={"movflags": "+faststart"}
    ) as final:
        final.metadata.update(tags)
        stream = final.add_stream_from_template(draft.streams.video[0])
        for packet in draft.demux(draft.streams.video[0]):
            if packet.dts is not None:  # the demuxer's empty end-of-stream packet
                packet.stream = stream
                final.mux(packet)


def write_video(
    path: str | os.PathLike, frames: Any, fps: float, metadata: Optional[dict] = None, *, overwrite: bool = False,
    crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET,
) -> Path:
    """Frames (T, H, W, 3) (uint8, or floats in [-1, 1]) as an H.264 mp4 at ``path``, with ``metadata`` in it and
    in its sidecar, through ``VideoWriter``; returns the absolute path."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not frames.shape[0]:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got shape {list(frames.shape)}")
    with VideoWriter(path, fps, metadata, overwrite=overwrite, crf=crf, preset=preset) as video:
        for frame in frames:
            video.write(frame)
    return video.path


def write_image(
    path: str | os.PathLike, image: Any, metadata: Optional[dict] = None, *, overwrite: bool = False
) -> Path:
    """An image (H, W, 3) (uint8, or floats in [-1, 1]) as a PNG at ``path``, ``metadata`` in its iTXt chunk and in
    its sidecar, atomically like ``VideoWriter``; returns the absolute path."""
    path = _output_path(path, ".png")
    rgb = to_uint8(image)
    if rgb.ndim != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {list(rgb.shape)}")
    compact, pretty = _metadata_texts(metadata)
    output = _staged(path, arguments.flag("overwrite", overwrite))
    with _writing(path, output):
        chunks = PngImagePlugin.PngInfo()
        chunks.add_itxt(METADATA_KEY, compact)
        Image.fromarray(rgb).save(output.paths[0], format="PNG", pnginfo=chunks)
        _put_in_place(output, pretty)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading the metadata back
# ----------------------------------------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata written with an mp4 or PNG, read from the file itself or from a sidecar ``.json`` given as
    ``path``; a file without ours is a ``MediaError`` saying so."""
    path = Path(path)
    if path.suffix.lower() == SIDECAR_SUFFIX:
        wrapped = read_json_object(path)
    else:
        wrapped = parse_json_object(_embedded_metadata(path), path)
    if not isinstance(wrapped.get(METADATA_KEY), dict):
        raise MediaError(f"{path}: has no {METADATA_KEY} metadata (a JSON object under {METADATA_KEY!r} expected)")
    return wrapped[METADATA_KEY]


def _embedded_metadata(path: Path) -> str:
    """The JSON text of our tag (mp4) or chunk (PNG) in ``path``, bounded."""
    if _looks_like_image(path):
        with _open_image(path) as image:
            text, where = image.info.get(METADATA_KEY), f"no {METADATA_KEY!r} PNG text chunk"
    else:
        with _open_video(path) as container:
            text, where = container.metadata.get(MP4_TAG), f"no {MP4_TAG!r} tag"
    if not isinstance(text, str) or not text.startswith('{"' + METADATA_KEY + '"'):
        found = where if text is None else "a tag that is not ours"
        raise MediaError(
            f"{path}: has no {METADATA_KEY} metadata ({found}); it was not written by starflow-mlx, or a tool "
            f"rewrote it (look for {sidecar_path(path).name} beside it)"
        )
    if len(text.encode()) > MAX_JSON_BYTES:
        raise MediaError(f"{path}: its metadata is larger than the {MAX_JSON_BYTES:,}-byte limit")
    return text
