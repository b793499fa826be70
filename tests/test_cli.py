"""``starflow-mlx generate | score | info`` end to end on tiny converted pipelines (random weights, every part real):
the mp4 / PNG and their records, seeds, best-of-N, scoring, and every bad input as one ``error:`` line, exit 2 and
no output file; Ctrl-C in a real process leaves nothing behind."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from starflow_mlx import media  # noqa: E402
from starflow_mlx.cli import main as cli_main  # noqa: E402
from tests.helpers import REPO  # noqa: E402

PROMPT = "a red car on a road"


def cli(*argv) -> int:
    """``main`` in-process; argparse's own refusals (SystemExit) become their exit status."""
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def generate(folders, out: Path, *extra, task="t2v") -> int:
    return cli("generate", PROMPT, "--model", folders[task], "--out", out, "--no-jacobi", *extra)


def one_error(caplog, capsys) -> str:
    """The one ``error:`` line of a refused command (logging, or argparse's stderr)."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    errors += [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: ") and "Traceback" not in caplog.text
    return errors[0]


def nothing_written(folder: Path) -> None:
    assert not list(folder.iterdir()), [p.name for p in folder.iterdir()]


# ----------------------------------------------------------------------------------------------------------------
# generate, info
# ----------------------------------------------------------------------------------------------------------------


def test_text_to_video_writes_the_mp4_its_sidecar_and_info_reads_it_back(folders, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert generate(folders, out, "--seed", 3, "--fps", 12) == 0
    probe = media.probe_media(out)
    assert (probe.kind, probe.frames, probe.width, probe.height, probe.fps) == ("video", 9, 64, 64, 12)
    record = media.read_metadata(out)
    assert record["task"] == "t2v" and record["prompt"] == PROMPT
    assert record["settings"]["seed"] == 3 and record["settings"]["fps"] == 12 and record["settings"]["jacobi"] is False
    assert json.loads(media.sidecar_path(out).read_text())["starflow-mlx"] == record
    capsys.readouterr()
    assert cli("info", out, "--json") == 0
    assert json.loads(capsys.readouterr().out) == record
    assert cli("info", out) == 0
    summary = capsys.readouterr().out
    assert f"prompt: {PROMPT}" in summary and "  seed: 3" in summary and "  fps: 12" in summary


def test_text_to_image_writes_a_png(folders, tmp_path, capsys):
    out = tmp_path / "image.png"
    assert generate(folders, out, task="t2i") == 0
    probe = media.probe_media(out)
    assert (probe.kind, probe.frames, probe.width, probe.height) == ("image", 1, 8, 8)  # 4x4 latent, SD VAE x2
    assert media.read_metadata(out)["task"] == "t2i" and media.read_metadata(out)["size"] == [8, 8]
    assert cli("info", media.sidecar_path(out), "--json") == 0
    assert json.loads(capsys.readouterr().out)["task"] == "t2i"


def test_every_setting_option_reaches_the_record(folders, tmp_path):
    out = tmp_path / "set.mp4"
    assert cli("generate", PROMPT, "--model", folders["t2v"], "--out", out, "--cfg", 2, "--aspect-ratio", "1:1",
               "--jacobi", "--jacobi-block-size", 8, "--jacobi-threshold", 0.01, "--jacobi-max-iter", 5,
               "--gradient-denoise", "--denoise-step-size", 0.5, "--target-noise-std", 0.2, "--context-length", 1,
               "--dtype", "float32") == 0
    settings = media.read_metadata(out)["settings"]
    assert {k: settings[k] for k in ("guidance", "aspect_ratio", "jacobi", "jacobi_block_size", "jacobi_threshold",
                                     "jacobi_max_iter", "denoise", "learnable_denoiser", "denoise_step_size",
                                     "target_noise_std", "context_length")} == {
        "guidance": 2.0, "aspect_ratio": "1:1", "jacobi": True, "jacobi_block_size": 8, "jacobi_threshold": 0.01,
        "jacobi_max_iter": 5, "denoise": True, "learnable_denoiser": False, "denoise_step_size": 0.5,
        "target_noise_std": 0.2, "context_length": 1}
    assert media.read_metadata(out)["noise_std"] == 0.2


def test_one_frame_of_a_video_pipeline_is_a_png(folders, tmp_path):
    out = tmp_path / "frame.png"
    assert generate(folders, out, "--frames", 1) == 0
    assert media.probe_media(out).kind == "image" and media.read_metadata(out)["settings"]["fps"] == 0


def test_image_to_video_starts_from_the_image(folders, tmp_path):
    image = tmp_path / "first.png"
    media.write_image(image, (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    out = tmp_path / "i2v.mp4"
    assert generate(folders, out, "--image", image) == 0
    record = media.read_metadata(out)
    assert record["task"] == "i2v" and record["given_frames"] == 1 and media.probe_media(out).frames == 9


def test_video_to_video_continues_a_clip_past_the_training_length(folders, tmp_path):
    clip = tmp_path / "clip.mp4"
    assert generate(folders, clip, "--no-denoise") == 0
    out = tmp_path / "continued.mp4"
    assert generate(folders, out, "--video", clip, "--given-frames", 5, "--frames", 13, "--no-denoise") == 0
    record = media.read_metadata(out)
    assert record["task"] == "v2v" and record["given_frames"] == 5 and record["settings"]["frames"] == 13
    assert record["given_from"] == "end"
    assert media.probe_media(out).frames == 13  # longer than the 9 frames the tiny pipeline was made for


def png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_same_seed_same_sample_other_seed_other_sample(folders, tmp_path):
    # PNG is lossless, so the pixels compare exactly; an mp4's encoding need not be byte-identical
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, (5, 5, 6)):
        assert generate(folders, path, "--seed", seed, "--frames", 1) == 0
    a, b, c = (png_pixels(p) for p in paths)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1
    clips = [tmp_path / name for name in ("a.mp4", "b.mp4")]
    for path in clips:
        assert generate(folders, path, "--seed", 5, "--no-denoise") == 0
    first, second = (media.read_metadata(p) for p in clips)
    assert first["bits_per_dim"] == second["bits_per_dim"] and first["settings"] == second["settings"]


def test_several_seeds_write_one_file_each(folders, tmp_path):
    assert generate(folders, tmp_path / "clip.mp4", "--seed", 1, 2, "--no-denoise") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["clip-seed1.mp4", "clip-seed1.mp4.json", "clip-seed2.mp4", "clip-seed2.mp4.json"]
    assert [media.read_metadata(tmp_path / f"clip-seed{s}.mp4")["settings"]["seed"] for s in (1, 2)] == [1, 2]


def test_best_of_keeps_the_lowest_bits_per_dim_and_reports_all(folders, tmp_path, capsys):
    out = tmp_path / "best.mp4"
    assert generate(folders, out, "--seed", 10, "--best-of", 3, "--no-denoise") == 0
    best = media.read_metadata(out)["best_of"]
    assert best["n"] == 3 and best["seeds"] == [10, 11, 12] and len(set(best["bits_per_dim"])) == 3
    kept = best["seeds"][int(np.argmin(best["bits_per_dim"]))]
    assert best["kept_seed"] == kept == media.read_metadata(out)["settings"]["seed"]
    # the kept file is that seed's sample: generated alone, it scores the lowest of the N
    alone = tmp_path / "alone.mp4"
    assert generate(folders, alone, "--seed", kept, "--no-denoise") == 0
    assert media.read_metadata(alone)["bits_per_dim"][0] == min(best["bits_per_dim"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.mp4", "alone.mp4.json", "best.mp4", "best.mp4.json"]


# ----------------------------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------------------------


def test_score_prints_one_line_per_caption_and_json(folders, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    assert generate(folders, clip, "--no-denoise") == 0
    captions = [PROMPT, "a blue boat"]
    capsys.readouterr()
    assert cli("score", clip, *captions, "--model", folders["t2v"], "--seed", 2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "noisy latent" in lines[2]
    scores = [float(line.split()[0]) for line in lines[:2]]
    assert [line.split(maxsplit=1)[1] for line in lines[:2]] == captions
    assert cli("score", clip, *captions, "--model", folders["t2v"], "--seed", 2, "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["captions"] == captions and record["media"] == str(clip)
    np.testing.assert_allclose(record["bits_per_dim"], scores, atol=1e-4)
    from starflow_mlx.pipeline import Pipeline

    expected = Pipeline.from_pretrained(folders["t2v"]).log_likelihood(clip, captions, seed=2).bits_per_dim
    assert record["bits_per_dim"] == expected.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------------

BAD_GENERATE = {
    "missing-model": (lambda f, tmp: ["--model", tmp / "nowhere"], "nowhere"),
    "missing-image": (lambda f, tmp: ["--image", tmp / "absent.png"], "absent.png"),
    "mp4-for-an-image": (lambda f, tmp: ["--model", f["t2i"]], ".png"),
    "unknown-suffix": (lambda f, tmp: ["--out", tmp / "out" / "clip.gif"], ".mp4"),
    "cfg-not-a-number": (lambda f, tmp: ["--cfg", "strong"], "--cfg"),
    "cfg-out-of-range": (lambda f, tmp: ["--cfg", "-1"], "--cfg must be a finite number in [0, 100], got -1"),
    "unknown-aspect-ratio": (lambda f, tmp: ["--aspect-ratio", "7:3"], "--aspect-ratio must be one of"),
    "frames-the-vae-cannot-make": (lambda f, tmp: ["--frames", "8"], "frames 8"),
    "best-of-zero": (lambda f, tmp: ["--best-of", "0"], "--best-of"),
    "negative-seed": (lambda f, tmp: ["--seed", "-3"], "--seed"),
    "given-frames-without-video": (lambda f, tmp: ["--given-frames", "5"], "--given-frames"),
    "given-from-without-video": (lambda f, tmp: ["--given-from", "start"], "--given-from goes with --video"),
    "image-and-video": (lambda f, tmp: ["--image", "a.png", "--video", "b.mp4"], "--video"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE), ids=list(BAD_GENERATE))
def test_bad_generate_input_is_one_line_exit_2_and_no_file(case, folders, tmp_path, caplog, capsys):
    make_argv, named = BAD_GENERATE[case]
    outputs = tmp_path / "out"
    outputs.mkdir()
    argv = ["generate", PROMPT, "--model", folders["t2v"], "--out", outputs / "clip.mp4",
            *make_argv(folders, tmp_path)]
    assert cli(*argv) == 2
    assert named in one_error(caplog, capsys)
    nothing_written(outputs)


def test_an_existing_output_is_refused_before_sampling(folders, tmp_path, caplog, capsys):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"mine")
    assert generate(folders, out) == 2
    assert "--overwrite" in one_error(caplog, capsys) and out.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


@pytest.mark.parametrize("case", ["missing-media", "missing-model", "file-without-metadata"])
def test_bad_score_and_info_input_is_one_line_exit_2(case, folders, tmp_path, caplog, capsys):
    from PIL import Image

    plain = tmp_path / "plain.png"  # a PNG not written by generate: no metadata
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(plain)
    argv = {
        "missing-media": ["score", tmp_path / "absent.mp4", PROMPT, "--model", folders["t2v"]],
        "missing-model": ["score", plain, PROMPT, "--model", tmp_path / "nowhere"],
        "file-without-metadata": ["info", plain],
    }[case]
    assert cli(*argv) == 2
    assert {"missing-media": "absent.mp4", "missing-model": "nowhere",
            "file-without-metadata": "plain.png"}[case] in one_error(caplog, capsys)


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C in a real process
# ----------------------------------------------------------------------------------------------------------------

INTERRUPTED_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from starflow_mlx import cli, media

    write = media.VideoWriter.write

    def write_then_interrupt(self, frame):  # a real SIGINT while the mp4 is half written
        write(self, frame)
        if self.frames_written == 3:
            os.kill(os.getpid(), signal.SIGINT)

    media.VideoWriter.write = write_then_interrupt
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_ctrl_c_while_writing_exits_130_and_leaves_no_file(folders, tmp_path):
    out = tmp_path / "clip.mp4"
    run = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_SCRIPT, "generate", PROMPT, "--model", str(folders["t2v"]),
         "--out", str(out), "--no-jacobi", "--no-denoise"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 130, run.stderr[-2000:]
    assert "error: interrupted" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_over_long_prompt_is_one_line_and_writes_nothing(folders, tmp_path, caplog, capsys):
    assert cli("generate", "a red car drives along a coastal road " * 8, "--model", folders["t2v"],
               "--out", tmp_path / "c.mp4") == 2
    assert one_error(caplog, capsys).startswith("error: prompt is too long: ")
    nothing_written(tmp_path)


def test_q_group_size_without_q_bits_is_refused(folders, tmp_path, caplog, capsys):
    assert cli("generate", "a red square", "--model", folders["t2v"], "--q-group-size", "32",
               "--out", tmp_path / "c.mp4") == 2
    assert one_error(caplog, capsys) == "error: --q-group-size applies to quantizing at load: pass --q-bits 4 or 8 with it"
    nothing_written(tmp_path)


def test_info_shows_control_characters_escaped():
    from starflow_mlx.cli import _short

    assert _short("a\nb\x1b[31mred") == "a\\nb\\x1b[31mred"
    assert _short({"k": "x\ty"}) == '{"k": "x\\ty"}'
