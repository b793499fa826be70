"""Every script in examples/ runs, in its own process, against the tiny converted T2V and T2I pipelines of
``tests/test_pipeline.py`` and writes what it says: an mp4 or PNG of the right kind, frame count and size, with the
generation's record in it; a bad model argument is one line and exit status 2, with nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from starflow_mlx import media  # noqa: E402
from tests.helpers import REPO  # noqa: E402
from tests.test_pipeline import PROMPT, picture  # noqa: E402

EXAMPLES = REPO / "examples"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def inputs(folders, tmp_path_factory) -> dict[str, Path]:
    """A PNG to start a clip from and a 9-frame mp4 to continue, at the T2V pipeline's fps."""
    root = tmp_path_factory.mktemp("example_inputs")
    fps = json.loads((folders["t2v"] / "config.json").read_text())["fps"]
    clip = np.stack([picture(seed=i, size=(48, 64)) for i in range(9)])
    return {"image": media.write_image(root / "start.png", picture(size=(48, 64))),
            "video": media.write_video(root / "clip.mp4", clip, fps)}


def run_example(script: str, *argv: str) -> subprocess.CompletedProcess:
    # this checkout's starflow_mlx, installed or not (a script's own folder is first on its sys.path, not the cwd)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


# script, pipeline, extra arguments ("{image}" / "{video}": the inputs), expected (kind, frames, width, height)
CASES = {
    "text_to_video": ("text_to_video.py", "t2v", [], ("video", 9, 64, 64)),
    "text_to_video_frames": ("text_to_video.py", "t2v", ["--frames", "5"], ("video", 5, 64, 64)),
    "text_to_image_t2i": ("text_to_image.py", "t2i", [], ("image", 1, 8, 8)),  # a 4x4 latent through the tiny SD VAE
    "text_to_image_one_video_frame": ("text_to_image.py", "t2v", [], ("image", 1, 64, 64)),
    "image_to_video": ("image_to_video.py", "t2v", ["--image", "{image}"], ("video", 9, 64, 64)),
    "video_to_video": ("video_to_video.py", "t2v", ["--video", "{video}", "--frames", "13", "--given-frames", "5"],
                       ("video", 13, 64, 64)),
    "long_video": ("long_video.py", "t2v", ["--context-length", "1"], ("video", 17, 64, 64)),
    "edit_video": ("edit_video.py", "t2v", ["--video", "{video}"], ("video", 9, 64, 64)),
    "last_frame": ("last_frame.py", "t2v", ["--image", "{image}"], ("video", 9, 64, 64)),
    "extend_video": ("extend_video.py", "t2v", ["--video", "{video}", "--given-frames", "5", "--frames", "13"],
                     ("video", 13, 64, 64)),
    "inversion_edit": ("inversion_edit.py", "t2v", ["--video", "{video}", "--source-prompt", "a clip"],
                       ("video", 9, 64, 64)),
    "score_and_best_of": ("score_and_best_of.py", "t2v", ["--n", "3", "--seed", "7"], ("video", 9, 64, 64)),
}


@pytest.mark.parametrize("case", CASES)
def test_example_writes_its_output(case, folders, inputs, tmp_path):
    script, task, extra, (kind, frames, width, height) = CASES[case]
    out = tmp_path / ("out.mp4" if kind == "video" else "out.png")
    argv = [arg.format(**inputs) for arg in extra]
    done = run_example(script, PROMPT, "--model", str(folders[task]), "--out", str(out), *argv)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(out)), done.stdout  # one result line, naming the file
    info = media.probe_media(out)
    assert (info.kind, info.frames, info.width, info.height) == (kind, frames, width, height)
    record = media.read_metadata(out)
    assert record["prompt"] == PROMPT and record["frames"] == frames
    assert media.sidecar_path(out).exists()
    if script == "score_and_best_of.py":
        check_best_of(lines[0], record)


def check_best_of(line: str, record: dict) -> None:
    """The kept sample is the one ranked first (lowest bits/dim) among the three seeds asked for."""
    kept = int(re.search(r"kept seed (\d+)", line).group(1))
    ranking = [(float(bits), int(seed)) for seed, bits in re.findall(r"seed (\d+): ([-\d.]+)", line)]
    assert sorted(seed for _, seed in ranking) == [7, 8, 9]
    assert ranking == sorted(ranking) and ranking[0][1] == kept == record["settings"]["seed"]
    assert len({bits for bits, _ in ranking}) == 3  # three different samples, three scores


@pytest.mark.parametrize("script", sorted({spec[0] for spec in CASES.values()}))
def test_example_refuses_a_missing_model_in_one_line(script, tmp_path):
    out = tmp_path / "out.mp4"
    missing = tmp_path / "no-such-pipeline"
    extra = {"image_to_video.py": ["--image", "x.png"], "video_to_video.py": ["--video", "x.mp4"],
             "edit_video.py": ["--video", "x.mp4"], "last_frame.py": ["--image", "x.png"],
             "extend_video.py": ["--video", "x.mp4"],
             "inversion_edit.py": ["--video", "x.mp4", "--source-prompt", "a clip"]}.get(script, [])
    done = run_example(script, PROMPT, "--model", str(missing), "--out", str(out), *extra)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert str(missing) in done.stderr or "no-such-pipeline" in done.stderr
    assert list(tmp_path.iterdir()) == []
