"""The model shipped in the package (``hub.default_model``): where it is looked up, that it is the model wherever
none is named (``Pipeline.from_pretrained()``, ``starflow-mlx generate|score|info`` without ``--model``), the one
line an incomplete install gets, and that a wheel and an sdist carry it and an installed wheel finds it.

Until the trained model is committed at ``starflow_mlx/models/shapes``, the tiny T2V pipeline (conftest's
``folders``), converted again with a provenance block, stands in for it where the default is looked up; the tests
hold once the real folder is there (the packaging test packs whichever folder is in the tree).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import starflow_mlx  # noqa: E402
from starflow_mlx import hub, media  # noqa: E402
from starflow_mlx.checkpoint import CheckpointError  # noqa: E402
from starflow_mlx.cli import main as cli_main  # noqa: E402
from tests.helpers import REPO  # noqa: E402

PROMPT = "a red square moving right"
PROVENANCE = {"name": "starflow-v-shapes", "version": "1", "command": "python -m tests.reference.train",
              "checkpoint_sha256": "cd" * 32}


def cli(*argv) -> int:
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def one_error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in caplog.text
    return errors[0]


@pytest.fixture(scope="module")
def stand_in(folders, tmp_path_factory) -> Path:
    """The tiny T2V pipeline with a provenance block, as the shipped model will have one."""
    from starflow_mlx.convert.pipeline import convert_pipeline

    tiny = folders["t2v"]
    out = tmp_path_factory.mktemp("shipped") / hub.DEFAULT_MODEL
    return convert_pipeline(out, flow=tiny / "flow", t5=tiny / "text", vae=tiny / "vae", provenance=PROVENANCE)


@pytest.fixture
def shipped(stand_in, monkeypatch) -> Path:
    monkeypatch.setattr(hub, "shipped_model_location", lambda: stand_in)
    return stand_in


@pytest.fixture
def not_shipped(tmp_path, monkeypatch) -> Path:
    """An install without the model folder."""
    missing = tmp_path / "site-packages" / "starflow_mlx" / "models" / hub.DEFAULT_MODEL
    monkeypatch.setattr(hub, "shipped_model_location", lambda: missing)
    return missing


def test_the_default_is_looked_up_inside_the_package():
    assert hub.shipped_model_location() == Path(starflow_mlx.__file__).parent / "models" / "shapes"
    assert hub.DEFAULT_MODEL_ID == "shapes (shipped with starflow-mlx)"


# ----------------------------------------------------------------------------------------------------------------
# The default wherever a model is named
# ----------------------------------------------------------------------------------------------------------------


def test_from_pretrained_without_a_model_loads_the_shipped_one(shipped):
    from starflow_mlx.pipeline import Pipeline

    assert hub.resolve_model() == hub.resolve_model(None) == starflow_mlx.default_model() == shipped
    default, named = Pipeline.from_pretrained(), Pipeline.from_pretrained(shipped)
    assert default.model_record() == {**named.model_record(), "id": hub.DEFAULT_MODEL_ID}
    assert default.model_record()["name"] == "starflow-v-shapes" and default.model_record()["version"] == "1"
    assert default.config == named.config == hub.read_pipeline_folder(shipped).config
    first = default.text_to_video(PROMPT, seed=4, jacobi=False, denoise=False)
    second = named.text_to_video(PROMPT, seed=4, jacobi=False, denoise=False)
    assert np.array_equal(first.frames, second.frames)


def test_generate_and_score_without_model_use_the_shipped_one(shipped, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert cli("generate", PROMPT, "--out", out, "--no-jacobi", "--no-denoise", "--seed", 2) == 0
    model = media.read_metadata(out)["model"]
    assert model["id"] == hub.DEFAULT_MODEL_ID and model["folder"] == str(shipped)
    assert (model["name"], model["version"]) == ("starflow-v-shapes", "1") and "command" not in json.dumps(model)
    named = tmp_path / "named.mp4"
    assert cli("generate", PROMPT, "--model", shipped, "--out", named, "--no-jacobi", "--no-denoise", "--seed", 2) == 0
    assert media.read_metadata(named)["bits_per_dim"] == media.read_metadata(out)["bits_per_dim"]
    assert media.read_metadata(named)["model"]["id"] == str(shipped)

    capsys.readouterr()
    assert cli("info", out) == 0
    assert "model: shapes (shipped with starflow-mlx), name starflow-v-shapes, version 1" in capsys.readouterr().out
    assert cli("score", out, PROMPT, "--json") == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["model"]["id"] == hub.DEFAULT_MODEL_ID and len(scored["bits_per_dim"]) == 1


def test_info_without_a_file_describes_the_shipped_model(shipped, folders, capsys):
    assert cli("info", "--json") == 0
    description = json.loads(capsys.readouterr().out)
    assert description["model"] == hub.DEFAULT_MODEL_ID and description["folder"] == str(shipped)
    assert (description["name"], description["version"], description["task"]) == ("starflow-v-shapes", "1", "t2v")
    assert description["provenance"] == PROVENANCE
    assert description["defaults"]["frames"] == 9 and description["defaults"]["fps"] == 16
    flow = hub.read_pipeline_folder(shipped).flow_config
    assert description["flow"]["parameters"] == flow.parameter_count() and description["flow"]["blocks"] == 6
    assert {name: part["model_type"] for name, part in description["parts"].items()} == {
        "flow": "flow", "text": "t5", "vae": "wan-vae"}

    assert cli("info") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [f"model: {hub.DEFAULT_MODEL_ID}", f"folder: {shipped}", "name: starflow-v-shapes",
                         "version: 1", "task: t2v"]
    assert lines[5] == (f"flow: {flow.parameter_count():,} parameters in 6 blocks; latent 48 x 4 x 4; text 64 tokens "
                        "of 64")
    assert lines[6:9] == ["flow: flow, float32", "text: t5, float32", "vae: wan-vae, float32"]
    assert "  guidance: 3.5" in lines and "provenance:" in lines and f"  checkpoint_sha256: {'cd' * 32}" in lines

    # another model, named: described the same way, without a provenance block
    assert cli("info", "--model", folders["t2i"], "--json") == 0
    other = json.loads(capsys.readouterr().out)
    assert (other["model"], other["task"], other["provenance"]) == (str(folders["t2i"]), "t2i", None)
    assert "name" not in other


def test_help_says_what_the_default_model_is(capsys):
    expected = " ".join(hub.DEFAULT_MODEL_HELP.split())
    for command in ("generate", "score", "info"):
        assert cli(command, "--help") == 0
        assert expected in " ".join(capsys.readouterr().out.split()), command


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------------

MISSING = ("{folder}: the model shipped with starflow-mlx is missing (an incomplete install); reinstall starflow-mlx, "
           "or name a model: --model PATH_OR_REPO (Pipeline.from_pretrained(path_or_repo) in Python)")


@pytest.mark.parametrize("command", ["generate", "score", "info"])
def test_an_install_without_the_model_is_one_line(command, not_shipped, tmp_path, caplog):
    image = tmp_path / "frame.png"
    media.write_image(image, np.zeros((8, 8, 3), np.uint8))
    outputs = tmp_path / "out"
    outputs.mkdir()
    argv = {"generate": ["generate", PROMPT, "--out", outputs / "clip.mp4"], "score": ["score", image, PROMPT],
            "info": ["info"]}[command]
    assert cli(*argv) == 2
    assert one_error(caplog) == "error: " + MISSING.format(folder=not_shipped)
    assert list(outputs.iterdir()) == [] and not not_shipped.exists()


def test_an_install_without_the_model_from_python(not_shipped):
    from starflow_mlx.pipeline import Pipeline

    with pytest.raises(CheckpointError) as caught:
        Pipeline.from_pretrained()
    assert str(caught.value) == MISSING.format(folder=not_shipped)


def test_an_incomplete_shipped_folder_names_the_missing_part(stand_in, tmp_path, monkeypatch, caplog):
    broken = tmp_path / hub.DEFAULT_MODEL
    shutil.copytree(stand_in, broken)
    shutil.rmtree(broken / "vae")
    monkeypatch.setattr(hub, "shipped_model_location", lambda: broken)
    assert cli("info") == 2
    assert one_error(caplog).startswith(f"error: {broken}: the pipeline's vae/ part (wan-vae or sd-vae) is missing")


def test_info_takes_a_file_or_a_model_not_both(shipped, tmp_path, caplog):
    image = tmp_path / "frame.png"
    media.write_image(image, np.zeros((8, 8, 3), np.uint8))
    assert cli("info", image, "--model", shipped) == 2
    assert one_error(caplog) == "error: info takes a FILE or --model, not both"


# ----------------------------------------------------------------------------------------------------------------
# Packaging: the wheel and the sdist carry the model, and an installed wheel finds it
# ----------------------------------------------------------------------------------------------------------------


def _project_copy(root: Path, stand_in: Path) -> Path:
    """The files a build reads, copied (the build writes build/ and *.egg-info beside them); the stand-in model put
    where the trained one goes, unless it is there already."""
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "starflow_mlx", project / "starflow_mlx", ignore=shutil.ignore_patterns("__pycache__"))
    model = project / "starflow_mlx" / "models" / hub.DEFAULT_MODEL
    if not model.exists():
        shutil.copytree(stand_in, model)
    return project


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(argv: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    run = subprocess.run([str(a) for a in argv], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_wheel_and_sdist_carry_the_model_and_an_installed_wheel_finds_it(stand_in, tmp_path):
    project = _project_copy(tmp_path, stand_in)
    model = project / "starflow_mlx" / "models" / hub.DEFAULT_MODEL
    files = {p.relative_to(project).as_posix(): _sha256(p.read_bytes()) for p in model.rglob("*") if p.is_file()}
    assert {"config.json", "flow/config.json", "text/spiece.model", "vae/config.json"} <= {
        name.removeprefix(f"starflow_mlx/models/{hub.DEFAULT_MODEL}/") for name in files}
    # lying in the tree, never packed: Finder's file, and what a killed conversion to models/shapes left beside it
    (project / "starflow_mlx" / "models" / ".DS_Store").write_bytes(b"\0")
    leftover = project / "starflow_mlx" / "models" / f".{hub.DEFAULT_MODEL}.tmp-4242-0123abcd"
    shutil.copytree(model, leftover)

    # offline: no index, the installed setuptools (no build isolation)
    offline = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", "."],
         project, **offline)
    wheel, = (tmp_path / "dist").glob("starflow_mlx-*.whl")
    with zipfile.ZipFile(wheel) as packed:
        models = {name: _sha256(packed.read(name)) for name in packed.namelist()
                  if name.startswith("starflow_mlx/models/")}
        assert models == files
        assert "starflow_mlx/schema/helper.schema.json" in packed.namelist()  # the helper protocol's, for apps
        packed.extractall(tmp_path / "site")  # the layout pip installs into site-packages

    script = "from setuptools import build_meta; print(build_meta.build_sdist('sdist'))"
    sdist = project / "sdist" / _run([sys.executable, "-c", script], project).stdout.split()[-1]
    with tarfile.open(sdist) as packed:
        top = sdist.name.removesuffix(".tar.gz")
        names = {name.removeprefix(f"{top}/") for name in packed.getnames()}
    assert set(files) <= names and not [name for name in names if "/models/." in name]

    # the installed wheel, from another folder: the package (not this checkout) and its model
    site = tmp_path / "site"
    run = _run([sys.executable, "-m", "starflow_mlx.cli", "info", "--json"], tmp_path, PYTHONPATH=str(site))
    description = json.loads(run.stdout)
    assert description["model"] == hub.DEFAULT_MODEL_ID
    assert description["folder"] == str(site / "starflow_mlx" / "models" / hub.DEFAULT_MODEL)
    assert description["task"] == "t2v"


@pytest.mark.parametrize("value", ["a\nb", "x\x1b[31mred", "tab\there"], ids=["newline", "escape", "tab"])
def test_provenance_names_with_control_characters_are_refused(value):
    from starflow_mlx.hub import check_provenance

    with pytest.raises(ValueError, match="holds a control character") as error:
        check_provenance({"name": value}, "provenance.json")
    assert "\n" not in str(error.value)
