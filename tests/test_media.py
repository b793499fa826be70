"""``starflow_mlx.media``: aspect-ratio buckets, conditioning images and videos read as the official code reads them,
mp4 / PNG written atomically with their metadata, the metadata read back, and the NaN / flat-sample check.

The official transforms are recomputed here independently (Pillow + torch, as torchvision does them: torchvision is
not installed); every hostile input is one parametrised case asserting the error (type, the file's path first, the
words naming the problem, one line) and that nothing was written or left behind. The decompression bombs run in a
subprocess under RLIMIT_AS, so a regression fails instead of swapping the machine.
"""

from __future__ import annotations

import json
import math
import re
import signal
import struct
import subprocess
import sys
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
from PIL import Image

from starflow_mlx import media
from starflow_mlx.media import MediaError
from starflow_mlx.staging import MARKER_NAME
from tests.helpers import REPO, snapshot

torch = pytest.importorskip("torch")

FPS = 16


def gradient_frames(count: int, height: int, width: int) -> np.ndarray:
    """Smooth moving colour gradients in [-1, 1], (T, H, W, 3) float32: content H.264 keeps well."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = [np.stack([np.sin(np.pi * (xx + t)), np.cos(np.pi * (yy + t)), xx * yy * 2 - 1], -1)
              for t in np.linspace(0, 1, count)]
    return np.stack(frames).astype(np.float32)


def level_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """Frame i a flat grey of level 20 + 10·i (uint8), so that a decoded frame tells which one it is."""
    return np.stack([np.full((height, width, 3), 20 + 10 * i, np.uint8) for i in range(count)])


def frame_levels(clip: media.VideoClip) -> list[int]:
    """Which ``level_frames`` frame each read frame is (their means survive H.264 and resizing within ±2)."""
    means = (clip.frames.mean(axis=(1, 2, 3)) + 1) * 127.5
    return [int(round((m - 20) / 10)) for m in means]


def one_line(error: BaseException, path: Path) -> str:
    message = str(error)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------------


def official_bucket(aspect_ratio: str, target_size: int, multiple: int) -> tuple[int, int]:
    """``dataset.aspect_ratio_to_image_size`` restated: area target², each side to the nearest multiple."""
    w, h = (int(v) for v in aspect_ratio.split(":"))
    ratio = w / h
    return (int(round(math.sqrt(target_size**2 / ratio) / multiple)) * multiple,
            int(round(math.sqrt(target_size**2 * ratio) / multiple)) * multiple)


# STARFlow-V (img_size 640, Wan VAE 16 x patch 1) by hand: 640² / (16/9) = 480², 640 · 4/3 = 853.3 -> 53 · 16.
STARFLOW_V_BUCKETS = {"1:1": (640, 640), "16:9": (480, 848), "9:16": (848, 480), "21:9": (416, 976)}


@pytest.mark.parametrize("aspect_ratio", media.ASPECT_RATIOS)
def test_bucket_sizes_match_the_official_formula(aspect_ratio):
    for base, multiple in ((640, 16), (256, 8), (512, 16)):
        height, width = media.bucket_size(aspect_ratio, base, multiple)
        assert (height, width) == official_bucket(aspect_ratio, base, multiple)
        assert height % multiple == width % multiple == 0
    if aspect_ratio in STARFLOW_V_BUCKETS:
        assert media.bucket_size(aspect_ratio, 640, 16) == STARFLOW_V_BUCKETS[aspect_ratio]
    assert media.bucket_size(None, 640, 16) == (640, 640)  # a model trained without mix_aspect


@pytest.mark.parametrize("aspect_ratio", ["random", "4:3", "16/9", "", 1.5])
def test_unknown_aspect_ratio_lists_the_valid_ones(aspect_ratio):
    with pytest.raises(ValueError, match="aspect_ratio must be one of 1:1, 2:3, 3:2, 16:9, 9:16") as caught:
        media.bucket_size(aspect_ratio, 640, 16)
    assert "\n" not in str(caught.value)


def test_a_bucket_rounding_to_zero_is_refused():
    with pytest.raises(ValueError, match="base_size 4 is too small for aspect ratio 21:9"):
        media.bucket_size("21:9", 4, 16)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning images: sample.py's prepare_input_image, restated with Pillow and torch
# ----------------------------------------------------------------------------------------------------------------


def official_prepare(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """torchvision's Resize((int(h·s), int(w·s))) on a PIL image (Pillow BILINEAR), CenterCrop, ToTensor and
    Normalize(0.5, 0.5), with ToTensor / Normalize done in torch as torchvision does."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize((int(image.width * scale), int(image.height * scale)), Image.BILINEAR)
    top = int(round((resized.height - height) / 2.0))
    left = int(round((resized.width - width) / 2.0))
    cropped = np.asarray(resized.crop((left, top, left + width, top + height)))
    tensor = torch.from_numpy(cropped.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor([0.5] * 3).view(3, 1, 1)
    return tensor.sub(mean).div(mean).numpy()


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# (source h, w) -> target (H, W): wider, taller, upscaled, exact, odd crops.
RESIZE_CASES = {
    "wide-down": ((120, 300), (48, 80)),
    "tall-down": ((301, 97), (64, 32)),
    "upscale": ((20, 30), (48, 64)),
    "exact": ((48, 64), (48, 64)),
    "odd-crop": ((77, 131), (32, 48)),
    "square-to-wide": ((100, 100), (48, 80)),
}


@pytest.mark.parametrize("case", RESIZE_CASES, ids=list(RESIZE_CASES))
def test_image_resize_and_crop_equal_the_official_transform(case, tmp_path):
    (h, w), size = RESIZE_CASES[case]
    image = noise_image(h, w)
    expected = official_prepare(image, size)
    np.testing.assert_array_equal(media.prepare_image(image, size), expected)
    image.save(tmp_path / "in.png")
    got = media.read_image(tmp_path / "in.png", size)
    assert got.dtype == np.float32 and got.shape == (3, *size)
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= -1 and got.max() <= 1


def test_a_side_left_one_pixel_short_by_floating_point_is_kept_not_padded_black():
    image = noise_image(22, 44)  # scale 480 / 22: int(22 · scale) == 479, where torchvision pads a black row
    assert int(22 * (480 / 22)) == 479
    got = media.prepare_image(image, (480, 848))
    assert got.shape == (3, 480, 848)
    assert (got[:, -1] > -1).any(), "the last row is not the black padding"
    scale = max(480 / 22, 848 / 44)
    resized = np.asarray(image.resize((int(44 * scale), 480), Image.BILINEAR))  # 959 x 480, the height kept
    left = int(round((resized.shape[1] - 848) / 2.0))
    np.testing.assert_array_equal(got, media.to_pixels(resized[:, left:left + 848]))


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_image_modes_are_made_rgb_on_purpose(tmp_path):
    size = (16, 16)
    # RGBA: a transparent pixel stores red, which convert("RGB") would show; over white it is white.
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:8, ..., 3] = 255  # top half opaque red, bottom half transparent
    got = media.read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"), size)
    np.testing.assert_array_equal(got[:, 0, 0], [1, -1, -1])
    np.testing.assert_array_equal(got[:, -1, 0], [1, 1, 1])
    # LA half transparent: grey 0 at alpha 128 over white -> 127.
    la = Image.fromarray(np.dstack([np.zeros((16, 16), np.uint8), np.full((16, 16), 128, np.uint8)]), "LA")
    got = media.read_image(save(la, tmp_path / "la.png"), size)
    np.testing.assert_allclose((got + 1) * 127.5, 127, atol=1)
    # P with a transparent palette entry.
    palette = Image.fromarray(np.zeros((16, 16), np.uint8), "P")
    palette.putpalette([0, 0, 255] * 256)
    got = media.read_image(save(palette, tmp_path / "p.png", transparency=0), size)
    np.testing.assert_array_equal(got, 1)
    # 16-bit grey: 65535 -> 255 and 32768 -> 128, not saturated at 255 as convert("RGB") does.
    grey16 = np.full((16, 16), 65535, np.uint16)
    grey16[8:] = 32768
    got = media.read_image(save(Image.fromarray(grey16), tmp_path / "g16.png"), size)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal((got[:, 0, 0] + 1) * 127.5, [255] * 3)
    np.testing.assert_allclose((got[:, -1, 0] + 1) * 127.5, [128] * 3, atol=1e-4)
    # L and JPEG / WebP read through the same path.
    grey = Image.fromarray(np.full((16, 16), 200, np.uint8), "L")
    np.testing.assert_allclose((media.read_image(save(grey, tmp_path / "l.png"), size) + 1) * 127.5, 200, atol=1e-4)
    for name, options in (("x.jpg", {"quality": 100}), ("x.webp", {"lossless": True})):
        got = media.read_image(save(grey.convert("RGB"), tmp_path / name, **options), size)
        np.testing.assert_allclose((got + 1) * 127.5, 200, atol=1.5)


def test_exif_orientation_turns_the_image_upright(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # left half white, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = save(Image.fromarray(pixels), tmp_path / "o.jpg", exif=exif, quality=100)
    got = media.read_image(path, (32, 16))  # displayed portrait: the white half on top
    assert got[:, :12].mean() > 0.9 and got[:, -12:].mean() < -0.9


# ----------------------------------------------------------------------------------------------------------------
# Conditioning videos
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def levels_video(tmp_path_factory) -> Path:
    """12 frames at 16 fps, frame i flat grey 20 + 10·i."""
    return media.write_video(tmp_path_factory.mktemp("video") / "levels.mp4", level_frames(12), FPS, crf=0)


def official_indices(total: int, count: int, out_fps: float | None, source_fps: float, start: int = 0) -> list[int]:
    """``dataset.sample_clip`` with its random start fixed."""
    if out_fps is None or out_fps >= source_fps:
        step = 1
    else:
        step = max((count - 1) / out_fps * source_fps / (count - 1), 1)
    return [int(np.round(start + i * step)) for i in range(count)]


# (frames, fps, from_end) -> the source frames picked.
VIDEO_PICKS = {
    "first-4": (4, None, False, [0, 1, 2, 3]),
    "all-12": (12, None, False, list(range(12))),
    "half-rate": (5, 8, False, [0, 2, 4, 6, 8]),
    "fifth": (4, 5, False, [0, 3, 6, 10]),  # step 3.2: 0, 3.2, 6.4, 9.6
    "higher-fps-keeps-rate": (3, 30, False, [0, 1, 2]),
    "last-3": (3, None, True, [9, 10, 11]),
    "last-4-half-rate": (4, 8, True, [5, 7, 9, 11]),
    "last-3-fifth": (3, 5, True, [5, 8, 11]),  # start 11 - 6.4 = 4.6
}


@pytest.mark.parametrize("case", VIDEO_PICKS, ids=list(VIDEO_PICKS))
def test_video_frames_are_picked_as_the_official_loader_picks_them(case, levels_video):
    frames, fps, from_end, expected = VIDEO_PICKS[case]
    clip = media.read_video(levels_video, (16, 24), frames, fps=fps, from_end=from_end)
    assert clip.indices == expected
    assert frame_levels(clip) == expected
    assert clip.frames.shape == (frames, 3, 16, 24) and clip.frames.dtype == np.float32
    assert clip.source_fps == FPS
    assert clip.fps == pytest.approx(fps if fps is not None and fps < FPS else FPS)
    assert clip.source_frames == (12 if from_end else None)
    if not from_end:
        assert expected == official_indices(12, frames, fps, FPS)


def test_video_frames_are_resized_as_images_are(tmp_path):
    frames = (np.random.default_rng(1).random((3, 40, 60, 3)) * 255).astype(np.uint8)
    path = media.write_video(tmp_path / "noise.mp4", frames, FPS, crf=0)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    clip = media.read_video(path, (24, 24), 3)
    for got, frame in zip(clip.frames, decoded):
        np.testing.assert_array_equal(got, official_prepare(Image.fromarray(frame), (24, 24)))


def test_a_rotated_video_is_turned_upright(tmp_path):
    path = tmp_path / "rotated.mp4"
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :24] = 255  # white top-left quadrant
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, as a phone records
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = media.read_video(path, (48, 32), 1)  # upright it is portrait
    frame = clip.frames[0].mean(axis=0)
    assert frame[-24:, :16].mean() > 0.9, "rotated 90° counter-clockwise, the white corner is bottom-left"
    assert frame[:24].mean() < -0.9


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading back
# ----------------------------------------------------------------------------------------------------------------

# Measured on these gradients at crf 10: within 13 levels, 2.5 on average (at crf 0 much the same: it is yuv420p's
# chroma subsampling of the colour ramps); flat colours come back within 2.
H264_MAX, H264_MEAN = 16, 3.0


@pytest.mark.parametrize("fps", [8, 16, 24, 12.5])
def test_mp4_round_trip_frame_count_size_fps_and_pixels(fps, tmp_path):
    frames = gradient_frames(9, 32, 48)
    path = media.write_video(tmp_path / "clip.mp4", frames, fps, {"fps": fps})
    info = media.probe_media(path)
    assert (info.kind, info.frames, info.width, info.height) == ("video", 9, 48, 32)
    assert info.fps == pytest.approx(fps)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.codec_context.colorspace == 1  # tagged BT.709
        back = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]).astype(int)
    error = np.abs(back - media.to_uint8(frames).astype(int))
    assert error.max() <= H264_MAX and error.mean() <= H264_MEAN, (error.max(), error.mean())


def test_float_to_uint8_is_the_official_save_image_rounding():
    values = np.concatenate([np.linspace(-1.2, 1.2, 2001), [-1, 1, 0, 1 / 255, -1 + 1 / 255]]).astype(np.float32)
    frames = values[: values.size // 3 * 3].reshape(1, -1, 1, 3).repeat(2, 0)
    x = torch.from_numpy(frames)
    official = ((x.clamp(-1, 1) + 1) * 0.5).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(media.to_uint8(frames), official)
    uint8 = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)
    assert media.to_uint8(uint8) is uint8


@pytest.mark.parametrize("size", [(17, 33), (18, 33), (17, 34)], ids=["both-odd", "odd-width", "odd-height"])
def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(size, tmp_path):
    height, width = size
    frames = np.zeros((2, height, width, 3), np.uint8)
    frames[..., -1, :, :] = 200  # last row
    frames[..., :, -1, :] = 100  # last column
    path = media.write_video(tmp_path / "odd.mp4", frames, FPS, crf=0)
    info = media.probe_media(path)
    assert (info.height, info.width) == (height + height % 2, width + width % 2)
    with av.open(str(path)) as container:
        back = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(int)
    np.testing.assert_allclose(back[:height, :width], frames[0], atol=12)  # chroma bleeds at the sharp edges
    if height % 2:
        np.testing.assert_allclose(back[-1, :-2], 200, atol=12)  # the repeated last row
    if width % 2:
        np.testing.assert_allclose(back[:-2, -1], 100, atol=12)


def test_png_round_trip_is_exact(tmp_path):
    image = gradient_frames(1, 21, 37)[0]
    path = media.write_image(tmp_path / "image.png", image, {"seed": 1})
    np.testing.assert_array_equal(np.asarray(Image.open(path)), media.to_uint8(image))
    assert media.probe_media(path) == media.MediaInfo("image", 37, 21, 1, None)


METADATA = {"prompt": "a corgi — 柴犬 \"quoted\"\nnext line", "seed": np.int64(7), "cfg": np.float32(3.5),
            "timings": {"text": 0.25, "decode": 1.5}, "frames": [1, 2, 3], "model": None, "jacobi": True}
METADATA_JSON = {**METADATA, "seed": 7, "cfg": 3.5}


@pytest.mark.parametrize("kind", ["mp4", "png"])
def test_metadata_round_trips_through_the_file_and_the_sidecar(kind, tmp_path):
    if kind == "mp4":
        path = media.write_video(tmp_path / "out.mp4", level_frames(2), FPS, METADATA)
        with av.open(str(path)) as container:
            tag = container.metadata["comment"]
    else:
        path = media.write_image(tmp_path / "out.png", level_frames(1)[0], METADATA)
        tag = Image.open(path).info["starflow-mlx"]
    assert json.loads(tag) == {"starflow-mlx": METADATA_JSON} and "\n" not in tag  # compact
    assert media.read_metadata(path) == METADATA_JSON
    sidecar = media.sidecar_path(path)
    assert sidecar.name == f"out.{kind}.json"
    assert media.read_metadata(sidecar) == METADATA_JSON
    assert json.loads(sidecar.read_text()) == {"starflow-mlx": METADATA_JSON}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, sidecar.name])


def test_streaming_writer_takes_frames_one_by_one_and_metadata_at_close(tmp_path):
    frames = gradient_frames(5, 16, 16)
    with media.VideoWriter(tmp_path / "stream.mp4", FPS, {"stage": "start"}) as video:
        for i, frame in enumerate(frames):
            video.write(frame)
            assert video.frames_written == i + 1
            assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
        path = video.close({"stage": "end", "frames": 5})
    assert media.read_metadata(path) == {"stage": "end", "frames": 5}
    assert media.read_metadata(media.sidecar_path(path)) == {"stage": "end", "frames": 5}
    assert media.probe_media(path).frames == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.mp4", "stream.mp4.json"]  # no hidden leftovers


# ----------------------------------------------------------------------------------------------------------------
# Files without our metadata
# ----------------------------------------------------------------------------------------------------------------


def foreign_mp4(folder: Path) -> Path:
    path = folder / "foreign.mp4"
    with av.open(str(path), "w") as container:
        container.metadata["comment"] = "made with another tool"
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(level_frames(1, 16, 16)[0], format="rgb24")),
                       *stream.encode()]:
            container.mux(packet)
    return path


NO_METADATA = {
    "plain-png": (lambda d: save(Image.new("RGB", (16, 16)), d / "plain.png"), "no 'starflow-mlx' PNG text chunk"),
    "jpeg": (lambda d: save(Image.new("RGB", (16, 16)), d / "plain.jpg"), "no 'starflow-mlx' PNG text chunk"),
    "foreign-mp4": (foreign_mp4, "a tag that is not ours"),
    "foreign-json": (lambda d: written(d / "other.json", b'{"model_type": "flow"}'), "has no starflow-mlx metadata"),
}


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", NO_METADATA, ids=list(NO_METADATA))
def test_a_file_without_our_metadata_says_so(case, tmp_path):
    build, words = NO_METADATA[case]
    path = build(tmp_path)
    with pytest.raises(MediaError) as caught:
        media.read_metadata(path)
    message = one_line(caught.value, path)
    assert "has no starflow-mlx metadata" in message and words in message


# ----------------------------------------------------------------------------------------------------------------
# Hostile and broken inputs
# ----------------------------------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(folder: Path) -> Path:
    """8200 x 8200 RGB of zeros (202 MB decoded, above MAX_PIXELS) deflated to about 200 KB."""
    width = height = 8200
    deflate, row = zlib.compressobj(9), bytes(width * 3 + 1)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return written(folder / "bomb.png", png_bytes(width, height, idat))


def image_file(name: str, **options) -> Callable[[Path], Path]:
    return lambda folder: save(noise_image(32, 32), folder / name, **options)


def truncated(build: Callable[[Path], Path], keep: float) -> Callable[[Path], Path]:
    def cut(folder: Path) -> Path:
        path = build(folder)
        data = path.read_bytes()
        return written(folder / f"cut-{path.name}", data[: int(len(data) * keep)])

    return cut


def corrupted_mdat(folder: Path) -> Path:
    """Our own mp4 with its coded frames zeroed: a valid container nothing can be decoded from."""
    data = bytearray(media.write_video(folder / "z.mp4", level_frames(3), FPS).read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)
    return written(folder / "zeroed.mp4", bytes(data))


def wav_file(folder: Path) -> Path:
    path = folder / "sound.wav"
    with wave.open(str(path), "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(bytes(1600))
    return path


def small_video(folder: Path) -> Path:
    return media.write_video(folder / "small.mp4", level_frames(2, 8, 8), FPS)


def folder_named(name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).mkdir()
        return folder / name

    return make


@dataclass
class Bad:
    build: Callable[[Path], Path]
    words: tuple[str, ...]
    bounded: bool = False  # a regression could eat memory: run under RLIMIT_AS in a subprocess


BAD_IMAGES = {
    "missing": Bad(lambda d: d / "missing.png", ("no such file",)),
    "folder": Bad(folder_named("dir.png"), ("is a folder, expected a file",)),
    "empty": Bad(lambda d: written(d / "empty.png", b""), ("is empty",)),
    "text": Bad(lambda d: written(d / "notes.png", b"just some text\n"), ("not an image in a format read here",
                                                                           "PNG, JPEG, WEBP")),
    "gif-not-accepted": Bad(image_file("x.gif"), ("not an image in a format read here",)),
    "bmp-not-accepted": Bad(image_file("x.bmp"), ("not an image in a format read here",)),
    "truncated-png": Bad(truncated(image_file("t.png"), 0.5), ("cannot read this image",)),
    "truncated-jpeg": Bad(truncated(image_file("t.jpg", quality=95), 0.5), ("cannot read this image", "truncated")),
    "png-bad-crc": Bad(lambda d: written(d / "crc.png", png_bytes(16, 16, b"garbage")[:-20] + bytes(20)),
                       ("cannot read this image",)),
    "tiny-image": Bad(lambda d: save(Image.new("RGB", (8, 40)), d / "tiny.png"),
                      ("the image is 8x40", "at least 16 pixels a side")),
    "decompression-bomb": Bad(png_bomb, ("the image is 8200x8200", "above the 67,108,864-pixel limit"),
                              bounded=True),
    "header-claims-huge": Bad(lambda d: written(d / "huge.png", png_bytes(100000, 100000, zlib.compress(b""))),
                              ("cannot read this image",), bounded=True),  # Pillow's own bomb check, above ours
}

BAD_VIDEOS = {
    "missing": Bad(lambda d: d / "missing.mp4", ("no such file",)),
    "folder": Bad(folder_named("dir.mp4"), ("is a folder, expected a file",)),
    "empty": Bad(lambda d: written(d / "empty.mp4", b""), ("is empty",)),
    "text": Bad(lambda d: written(d / "notes.mp4", b"just some text\n" * 10), ("cannot read this video",
                                                                               "Invalid data")),
    "truncated-header": Bad(truncated(lambda d: media.write_video(d / "v.mp4", level_frames(4), FPS), 0.05),
                            ("has no video stream",)),
    "no-decodable-frames": Bad(corrupted_mdat, ("cannot read this video",)),
    "audio-only": Bad(wav_file, ("has no video stream",)),
    "tiny-frames": Bad(small_video, ("the video is 8x8", "at least 16 pixels a side")),
    "too-few-frames": Bad(lambda d: media.write_video(d / "short.mp4", level_frames(3), FPS),
                          ("the video has 3 frames; 5 frames span 5", "ask for fewer frames")),
}


def assert_refused(bad: Bad, tmp_path: Path, read: str, arguments: str):
    source = bad.build(tmp_path)
    before = snapshot(tmp_path)
    if bad.bounded:
        error_type, message = read_bounded(read, source, arguments)
    else:
        with pytest.raises(ValueError) as caught:
            eval(f"media.{read}(source, {arguments})", {"media": media, "source": source})
        error_type, message = type(caught.value).__name__, str(caught.value)
    assert error_type == "MediaError", message
    assert message.startswith(f"{source}: ") and "\n" not in message, message
    for words in bad.words:
        assert words in message, message
    assert snapshot(tmp_path) == before  # nothing written, nothing left behind


@pytest.mark.parametrize("case", BAD_IMAGES, ids=list(BAD_IMAGES))
def test_bad_image_is_one_line_naming_the_file(case, tmp_path):
    assert_refused(BAD_IMAGES[case], tmp_path, "read_image", "(32, 32)")


@pytest.mark.parametrize("case", BAD_VIDEOS, ids=list(BAD_VIDEOS))
def test_bad_video_is_one_line_naming_the_file(case, tmp_path):
    assert_refused(BAD_VIDEOS[case], tmp_path, "read_video", "(16, 16), 5")


# The child measures its address space after importing (MLX reserves much of it), then allows 160 MiB more: a
# bounded reader needs a few; decoding the bomb would need 200 MB. RLIMIT_CPU and the timeout turn a hang into a
# failure.
BOUNDED_EXTRA_BYTES = 160 << 20
BOUNDED_READ = """
import json, re, resource, sys
from starflow_mlx import media
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[3]), vm + int(sys.argv[3])))
resource.setrlimit(resource.RLIMIT_CPU, (30, 30))
try:
    eval(f"media.{sys.argv[1]}(sys.argv[2], {sys.argv[4]})")
    print(json.dumps({"type": None, "message": "read"}))
except ValueError as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


def read_bounded(read: str, source: Path, arguments: str) -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", BOUNDED_READ, read, str(source), str(BOUNDED_EXTRA_BYTES), arguments],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, f"the bounded reader died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.splitlines()[-1])
    return result["type"], result["message"]


def test_the_video_size_is_checked_from_the_header_before_any_frame_is_decoded(tmp_path, monkeypatch):
    path = media.write_video(tmp_path / "v.mp4", level_frames(2), FPS)
    monkeypatch.setattr(media, "MAX_PIXELS", 32 * 48 - 1)
    monkeypatch.setattr(media, "_decoded", lambda *a: pytest.fail("a frame was decoded"))
    with pytest.raises(MediaError, match=r"the video is 48x32, above the 1,535-pixel limit") as caught:
        media.read_video(path, (16, 16), 1)
    one_line(caught.value, path)


def test_a_frame_larger_than_the_header_said_is_refused(tmp_path, monkeypatch):
    path = media.write_video(tmp_path / "v.mp4", level_frames(2), FPS)
    checked = []
    real_check = media._check_dimensions

    def strict_after_the_header(p, width, height, kind):  # the header passes; every decoded frame "too large"
        checked.append((width, height))
        factor = 1000 if len(checked) > 1 else 1
        real_check(p, width * factor, height * factor, kind)

    monkeypatch.setattr(media, "_check_dimensions", strict_after_the_header)
    with pytest.raises(MediaError, match="the video is 48000x32000"):
        media.read_video(path, (16, 16), 1)
    assert len(checked) == 2  # the header, then the first decoded frame, refused before it was converted


BAD_ARGUMENTS = {
    "frames-0": ("read_video", dict(size=(16, 16), frames=0), "frames must be >= 1"),
    "frames-float": ("read_video", dict(size=(16, 16), frames=2.5), "frames must be an integer"),
    "fps-0": ("read_video", dict(size=(16, 16), frames=1, fps=0), "fps must be > 0"),
    "fps-nan": ("read_video", dict(size=(16, 16), frames=1, fps=float("nan")), "fps must be a finite number"),
    "size-zero": ("read_image", dict(size=(0, 16)), "height must be >= 1"),
    "size-scalar": ("read_image", dict(size=16), "size must be (height, width)"),
    "size-huge": ("read_image", dict(size=(10**5, 10**5)), "above the 67,108,864-pixel limit"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=list(BAD_ARGUMENTS))
def test_bad_reading_arguments(case, levels_video, tmp_path):
    read, kwargs, words = BAD_ARGUMENTS[case]
    source = levels_video if read == "read_video" else save(noise_image(32, 32), tmp_path / "x.png")
    with pytest.raises(ValueError, match=re.escape(words)):
        getattr(media, read)(source, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Writing safely
# ----------------------------------------------------------------------------------------------------------------


def write_mp4(path: Path, **options) -> Path:
    return media.write_video(path, level_frames(2, 16, 16), FPS, {"new": True}, **options)


def write_png(path: Path, **options) -> Path:
    return media.write_image(path, level_frames(1, 16, 16)[0], {"new": True}, **options)


def existing(name: str) -> Callable[[Path], Path]:
    return lambda folder: written(folder / name, b"the user's file")


def link_to_file(name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        written(folder / "precious", b"the user's file")
        (folder / name).symlink_to(folder / "precious")
        return folder / name

    return make


BAD_TARGETS = {
    "exists-mp4": (existing("out.mp4"), "out.mp4", {}, "already exists (pass overwrite=True / --overwrite"),
    "exists-png": (existing("out.png"), "out.png", {}, "already exists"),
    "sidecar-exists": (existing("out.mp4.json"), "out.mp4", {}, "out.mp4.json: already exists"),
    "folder-mp4": (folder_named("out.mp4"), "out.mp4", {"overwrite": True}, "is a folder; name a file"),
    "folder-png": (folder_named("out.png"), "out.png", {"overwrite": True}, "is a folder; name a file"),
    "symlink-mp4": (link_to_file("out.mp4"), "out.mp4", {"overwrite": True}, "is a symbolic link"),
    "symlink-png": (link_to_file("out.png"), "out.png", {"overwrite": True}, "is a symbolic link"),
    "no-parent": (lambda d: d, "missing/out.mp4", {}, "does not exist"),
    "wrong-suffix": (lambda d: d, "out.avi", {}, "expected a file name ending in .mp4"),
    "png-suffix": (lambda d: d, "out.jpg", {}, "expected a file name ending in .png"),
}


@pytest.mark.parametrize("case", BAD_TARGETS, ids=list(BAD_TARGETS))
def test_a_target_that_must_not_be_written_is_refused_untouched(case, tmp_path):
    build, name, options, words = BAD_TARGETS[case]
    build(tmp_path)
    before = snapshot(tmp_path)
    write = write_png if name.endswith((".png", ".jpg")) and case != "wrong-suffix" else write_mp4
    with pytest.raises(MediaError) as caught:
        write(tmp_path / name, **options)
    assert words in one_line(caught.value, Path(str(caught.value).split(": ")[0]))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("write", [write_mp4, write_png], ids=["mp4", "png"])
def test_overwrite_replaces_an_existing_file_and_its_sidecar(write, tmp_path):
    suffix = ".mp4" if write is write_mp4 else ".png"
    target = written(tmp_path / f"out{suffix}", b"old")
    written(media.sidecar_path(target), b"old")
    write(target, overwrite=True)
    assert media.read_metadata(target) == {"new": True} == media.read_metadata(media.sidecar_path(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, target.name + ".json"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("interrupt", [Boom, KeyboardInterrupt], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("exists", [False, True], ids=["new", "replacing"])
def test_a_failure_mid_stream_leaves_no_partial_file(interrupt, exists, tmp_path):
    target = tmp_path / "out.mp4"
    if exists:
        written(target, b"the user's video")
    before = snapshot(tmp_path)
    with pytest.raises(interrupt):
        with media.VideoWriter(target, FPS, {"a": 1}, overwrite=True) as video:
            for frame in level_frames(3):
                video.write(frame)
            # the draft, the file and the sidecar, hidden, each with its marker
            assert len(list(tmp_path.iterdir())) == len(before) + 6
            raise interrupt()
    assert snapshot(tmp_path) == before


WRITE_FAILURES = {
    "nan-frame": (lambda v: v.write(np.full((16, 16, 3), np.nan, np.float32)), ValueError,
                  "frames to write: the sample holds NaN or inf (768 of 768 values)"),
    "changed-shape": (lambda v: (v.write(level_frames(1, 16, 16)[0]), v.write(level_frames(1, 16, 18)[0])),
                      ValueError, "every frame must have the first one's shape [16, 16, 3]"),
    "grey-frame": (lambda v: v.write(np.zeros((16, 16), np.uint8)), ValueError, "frames must be (..., H, W, 3)"),
    "int-frame": (lambda v: v.write(np.zeros((16, 16, 3), np.int32)), ValueError, "uint8, or floating point"),
    "no-frames": (lambda v: v.close(), MediaError, "no frame was written"),
    "disk-full": (lambda v: (v.write(level_frames(1, 16, 16)[0]), v.close()), MediaError,
                  "cannot write: No space left on device"),
}


@pytest.mark.parametrize("case", WRITE_FAILURES, ids=list(WRITE_FAILURES))
def test_a_failing_write_aborts_and_leaves_nothing(case, tmp_path, monkeypatch):
    act, error, words = WRITE_FAILURES[case]
    if case == "disk-full":
        def full(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(media.os, "replace", full)
    video = media.VideoWriter(tmp_path / "out.mp4", FPS)
    with pytest.raises(error, match=re.escape(words)) as caught:
        act(video)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="the writer is closed"):
        video.write(level_frames(1, 16, 16)[0])


BAD_WRITE_ARGUMENTS = {
    "fps-0": (dict(fps=0), "fps must be > 0"),
    "fps-huge": (dict(fps=1000), "fps must be at most 240"),
    "fps-nan": (dict(fps=float("nan")), "fps must be a finite number"),
    "crf-52": (dict(crf=52), "crf must be in [0, 51]"),
    "crf-negative": (dict(crf=-1), "crf must be >= 0"),
    "preset": (dict(preset="warp"), "preset must be one of ultrafast"),
    "metadata-nan": (dict(metadata={"cfg": float("nan")}), "metadata cannot be stored as JSON"),
    "metadata-object": (dict(metadata={"x": object()}), "a object is not a JSON value"),
    "metadata-list": (dict(metadata=[1, 2]), "metadata must be a dict"),
    "metadata-huge": (dict(metadata={"x": "y" * (1 << 20)}), "above the 1,048,576 limit"),
    "frames-3d": (dict(frames=np.zeros((16, 16, 3), np.uint8)), "frames must be (T, H, W, 3) with T >= 1"),
    "frames-empty": (dict(frames=np.zeros((0, 16, 16, 3), np.uint8)), "frames must be (T, H, W, 3) with T >= 1"),
}


@pytest.mark.parametrize("case", BAD_WRITE_ARGUMENTS, ids=list(BAD_WRITE_ARGUMENTS))
def test_bad_writing_arguments_are_refused_before_any_file(case, tmp_path):
    options, words = BAD_WRITE_ARGUMENTS[case]
    arguments = {"frames": level_frames(2, 16, 16), "fps": FPS, **options}
    with pytest.raises(ValueError, match=re.escape(words)):
        media.write_video(tmp_path / "out.mp4", **arguments)
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import sys, time
import numpy as np
from starflow_mlx import media
video = media.VideoWriter(sys.argv[1], 16, {"run": 1})
video.write(np.zeros((16, 16, 3), np.uint8))
print("writing", flush=True)
time.sleep(60)
"""


def test_what_a_killed_run_left_is_removed_by_the_next_write_and_a_live_one_is_not(tmp_path, caplog):
    target = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        hidden = sorted(p.name for p in tmp_path.iterdir())
        assert len(hidden) == 6 and all(name.startswith((".out.mp4.tmp-", ".out.mp4.json.tmp-")) for name in hidden)
        assert sum(name.endswith(MARKER_NAME) for name in hidden) == 3
        with pytest.raises(ValueError, match="is writing it"):  # locked: a live run's files are left alone
            write_mp4(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == hidden
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    caplog.set_level("WARNING")
    write_mp4(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.mp4.json"]
    assert sum("left behind by a killed" in r.getMessage() for r in caplog.records) == 3


# ----------------------------------------------------------------------------------------------------------------
# The NaN / flat-sample check
# ----------------------------------------------------------------------------------------------------------------

SAMPLES = {
    "nan": (np.array([[0.1, np.nan], [0.2, 0.3]], np.float32), None, "deep block: the sample holds NaN or inf (1 of 4"),
    "inf": (np.array([0.1, -np.inf, np.inf], np.float32), None, "deep block: the sample holds NaN or inf (2 of 3"),
    "constant": (np.full((2, 3, 4, 4), -0.25, np.float32), None,
                 "deep block: the sample collapsed to the constant -0.25"),
    "saturated": (np.linspace(1.5, 9, 24, dtype=np.float32), (-1, 1), "collapsed to the constant 1 (all 24 values)"),
}


@pytest.mark.parametrize("case", SAMPLES, ids=list(SAMPLES))
def test_nan_inf_and_flat_samples_name_the_stage_and_the_fix(case):
    values, value_range, words = SAMPLES[case]
    with pytest.raises(ValueError) as caught:
        media.check_sample(values, "deep block", value_range)
    message = str(caught.value)
    assert words in message and "\n" not in message, message
    assert "float32" in message and "8-bit rather than 4-bit" in message


def test_a_healthy_sample_passes_the_check():
    import mlx.core as mx

    media.check_sample(gradient_frames(2, 8, 8), "decode", (-1, 1))
    media.check_sample(mx.array(np.linspace(-3, 3, 50, dtype=np.float32)), "deep block")
    media.check_sample(np.array([0, 1], np.uint8), "decode")
