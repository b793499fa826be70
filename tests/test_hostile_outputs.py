"""Hostile output paths and weights: what ``--overwrite`` may replace, where a conversion may write, failed and
killed conversions, weights that a dtype cannot hold, and one-line command-line errors.

Every refusal is checked by its error (type and the words naming the problem) and by the files: every path under
the test's folder is compared byte for byte before and after (``snapshot``), so nothing was written, replaced or
deleted and no hidden ``.OUT.tmp-*`` / ``.OUT.old-*`` folder was left. Signals go to a conversion in a subprocess
(under the resource limits and timeout of ``tests.helpers.start_bounded``) that says through a file when it is
blocked in the middle of its work, so nothing races. The converters' sources are test_converters' own tiny ones.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import types
import zipfile
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from starflow_mlx.checkpoint import CheckpointError  # noqa: E402
from starflow_mlx.cli import main as cli_main  # noqa: E402
from starflow_mlx.convert.flow import convert_flow  # noqa: E402
from starflow_mlx.flow import load_flow  # noqa: E402
from starflow_mlx.weights import (  # noqa: E402
    MARKER_NAME,
    TOKENIZER_FILES,
    OutputFolderError,
    read_config,
    read_model_folder,
)
from tests.helpers import finish_bounded, snapshot, start_bounded  # noqa: E402
from tests.test_converters import SOURCES, sd_model, t5_parts, wan_state  # noqa: E402,F401 (fixtures of SOURCES)

# The module each converter reads its checkpoints through (patched to fail or be interrupted while reading).
CONVERTER_MODULES = {"flow": "flow", "t5": "t5", "wan-vae": "wan_vae", "sd-vae": "sd_vae"}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def run_cli(argv: list[str], capsys, caplog) -> tuple[int, list[str], str]:
    """Exit status, the ``error:`` lines and all the text the command line wrote (logged or printed)."""
    caplog.clear()
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    out, err = capsys.readouterr()
    lines = [line for r in caplog.records for line in r.getMessage().splitlines()] + (out + err).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return code, errors, "\n".join([caplog.text, out, err])


def source(kind: str, tmp_path: Path, request):
    """A valid source of ``kind`` under ``tmp_path``, saved."""
    src = SOURCES[kind](tmp_path, request)
    torch.save(src.state, src.weights)
    return src


def flow_argv(tiny_video) -> list[str]:
    return ["convert", "flow", str(tiny_video.checkpoint), str(tiny_video.yaml)]


@pytest.fixture
def model_folder(tiny_video, tmp_path) -> Path:
    """A converted flow folder of the test's own, to be replaced or protected."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_video.folder, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Output paths that must never be written or replaced
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["out-holds-the-source", "out-is-the-source", "out-is-the-source-through-a-link"])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_output_never_is_or_holds_a_source(kind, case, tmp_path, request, capsys, caplog):
    src = source(kind, tmp_path, request)
    (tmp_path / "alias").symlink_to(tmp_path)
    out = {
        "out-holds-the-source": tmp_path,
        "out-is-the-source": src.root,
        "out-is-the-source-through-a-link": tmp_path / "alias" / src.root.name,
    }[case]
    before = snapshot(tmp_path)

    code, errors, text = run_cli(["convert", kind, *src.argv, str(out), "--overwrite"], capsys, caplog)

    assert code == 2 and len(errors) == 1 and "Traceback" not in text
    words = "holds the source" if case == "out-holds-the-source" else "is the source"
    assert errors[0].startswith(f"error: {out}: {words} ")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["flow", "sd-vae"])
def test_output_never_holds_the_config_file(kind, tmp_path, request, capsys, caplog):
    """The second source of a conversion: the flow's YAML, or the config.json given to sd-vae by --config."""
    src = source(kind, tmp_path, request)
    configs = tmp_path / "configs"
    configs.mkdir()
    if kind == "flow":
        shutil.copy(src.argv[1], configs / "config.yaml")
        argv = ["convert", kind, src.argv[0], str(configs / "config.yaml"), str(configs), "--overwrite"]
    else:
        shutil.copy(src.root / "config.json", configs / "vae.json")
        argv = ["convert", kind, *src.argv, str(configs), "--config", str(configs / "vae.json"), "--overwrite"]
    before = snapshot(tmp_path)

    code, errors, text = run_cli(argv, capsys, caplog)

    assert code == 2 and len(errors) == 1 and "Traceback" not in text
    assert errors[0].startswith(f"error: {configs}: holds the source {configs}/")
    assert snapshot(tmp_path) == before


def test_a_new_folder_inside_a_source_folder_is_fine(tmp_path, request):
    from starflow_mlx.convert.t5 import convert_t5

    src = source("t5", tmp_path, request)
    before = snapshot(src.root)
    out = convert_t5(src.root, src.root / "mlx")
    assert read_config(out)["model_type"] == "t5"
    assert {k: v for k, v in snapshot(src.root).items() if not k.startswith("mlx")} == before


# ----------------------------------------------------------------------------------------------------------------
# Paths through links: loops, and files a source folder names that link outside it
# ----------------------------------------------------------------------------------------------------------------

LOOPS = [(kind, "source") for kind in SOURCES] + [("flow", "yaml"), ("sd-vae", "config"), ("flow", "out-parent")]


@pytest.mark.parametrize("kind, where", LOOPS, ids=[f"{kind}-{where}" for kind, where in LOOPS])
def test_a_loop_of_links_anywhere_in_a_path_is_one_error(kind, where, tmp_path, request, capsys, caplog):
    src = source(kind, tmp_path, request)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv, out, extra, named = list(src.argv), tmp_path / "out", [], loop
    if where == "source":
        argv[0] = str(loop)
    elif where == "yaml":
        argv[1] = str(loop)
    elif where == "config":
        extra = ["--config", str(loop)]
    else:
        out = named = loop / "out"
    before = snapshot(tmp_path)

    code, errors, text = run_cli(["convert", kind, *argv, str(out), *extra], capsys, caplog)

    assert code == 2 and "Traceback" not in text
    assert errors == [f"error: {named}: cannot be followed: it, or a folder above it, is a loop of symbolic links"]
    assert snapshot(tmp_path) == before


def _link_outside(path: Path, secret: Path) -> str:
    path.symlink_to(secret)
    return f"tokenizer file {path.name} links to {secret.resolve()}, outside the folder {path.parent}"


def _folder_in_its_place(path: Path, secret: Path) -> str:
    path.mkdir()
    return f"the tokenizer file {path.name} is not a regular file"


@pytest.mark.parametrize("make", [_link_outside, _folder_in_its_place], ids=["link-outside", "folder-in-its-place"])
@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_a_tokenizer_file_that_is_not_a_file_in_the_source_is_refused(name, make, tmp_path, request, capsys, caplog):
    """A link to anywhere would be read and copied into the output (a disclosure): the rule of the weight shards."""
    src = source("t5", tmp_path, request)
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private data")
    (src.root / name).unlink(missing_ok=True)
    words = make(src.root / name, secret)
    before = snapshot(tmp_path)

    code, errors, text = run_cli(["convert", "t5", *src.argv, str(tmp_path / "out")], capsys, caplog)

    assert code == 2 and "Traceback" not in text
    assert errors == [f"error: {src.root}: {words}"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["link-inside-the-folder", "hugging-face-cache"])
def test_tokenizer_files_linked_inside_the_source_are_copied(layout, tmp_path, request):
    from starflow_mlx.convert.t5 import convert_t5

    cache = tmp_path / "models--flan-t5"
    parent = cache / "snapshots" if layout == "hugging-face-cache" else tmp_path
    parent.mkdir(parents=True, exist_ok=True)
    src = source("t5", parent, request)
    linked = src.root / "tokenizer_config.json"
    data = linked.read_bytes()
    target = cache / "blobs" / "0123abcd" if layout == "hugging-face-cache" else src.root / "original.json"
    target.parent.mkdir(exist_ok=True)
    linked.rename(target)
    linked.symlink_to(os.path.relpath(target, src.root))

    out = convert_t5(src.root, tmp_path / "out")

    assert (out / linked.name).read_bytes() == data and not (out / linked.name).is_symlink()
    assert linked.name in read_config(out)["tokenizer"]["files"]


def out_is_a_file(tmp: Path, model: Path):
    (tmp / "out").write_text("the user's notes")
    return tmp / "out", "exists and is a file, not a model folder"


def out_is_a_link_to_a_model_folder(tmp: Path, model: Path):
    (tmp / "out").symlink_to(model)
    return tmp / "out", "is a symbolic link"


def out_is_a_link_to_a_file(tmp: Path, model: Path):
    (tmp / "notes.txt").write_text("the user's notes")
    (tmp / "out").symlink_to(tmp / "notes.txt")
    return tmp / "out", "is a symbolic link"


def out_is_a_dangling_link(tmp: Path, model: Path):
    (tmp / "out").symlink_to(tmp / "nowhere")
    return tmp / "out", "is a symbolic link"


def out_is_a_folder_of_user_files(tmp: Path, model: Path):
    out = tmp / "out"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "a.jpg").write_bytes(bytes(range(256)))
    (out / "notes.txt").write_text("the user's notes")
    return out, "is not a starflow-mlx model folder (no config.json written by starflow-mlx)"


def out_has_another_programs_config(tmp: Path, model: Path):
    out = tmp / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))  # Hugging Face's
    (out / "model.safetensors").write_bytes(b"weights")
    return out, "is not a starflow-mlx model folder (no config.json written by starflow-mlx)"


def out_is_a_model_folder_with_a_user_file(tmp: Path, model: Path):
    (model / "notes.txt").write_text("the user's notes")
    return model, "is not a starflow-mlx model folder (it also holds notes.txt)"


def out_is_a_model_folder_with_a_user_folder(tmp: Path, model: Path):
    (model / "old-weights").mkdir()
    (model / "old-weights" / "a.bin").write_bytes(b"1234")
    return model, "is not a starflow-mlx model folder (it also holds old-weights)"


def out_is_a_model_folder_with_a_folder_named_like_finders_file(tmp: Path, model: Path):
    (model / ".DS_Store").mkdir()
    (model / ".DS_Store" / "x").write_text("the user's data")
    return model, "is not a starflow-mlx model folder (it also holds .DS_Store)"


def out_is_a_model_folder_with_a_link_named_like_finders_file(tmp: Path, model: Path):
    (tmp / "notes.txt").write_text("the user's notes")
    (model / ".DS_Store").symlink_to(tmp / "notes.txt")
    return model, "is not a starflow-mlx model folder (it also holds .DS_Store)"


def _list_tokenizer_files(model: Path, files: list[str]) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tokenizer": {"extra_ids": 0, "files": files}}))


def out_lists_a_user_file_as_a_tokenizer_file(tmp: Path, model: Path):
    _list_tokenizer_files(model, ["thesis.tex"])
    (model / "thesis.tex").write_text("the user's thesis")
    return model, "is not a starflow-mlx model folder (it also holds thesis.tex)"


def out_has_a_tokenizer_file_that_is_a_link(tmp: Path, model: Path):
    _list_tokenizer_files(model, ["tokenizer.json"])
    (tmp / "notes.json").write_text("{}")
    (model / "tokenizer.json").symlink_to(tmp / "notes.json")
    return model, "is not a starflow-mlx model folder (it also holds tokenizer.json)"


def out_is_under_a_file(tmp: Path, model: Path):
    (tmp / "notes.txt").write_text("the user's notes")
    return tmp / "notes.txt" / "out", f"cannot be created: {tmp / 'notes.txt'} is a file, not a folder"


def out_name_is_too_long(tmp: Path, model: Path):
    return tmp / ("x" * 300), "the folder name is too long (300 bytes"


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize(
    "make",
    [
        out_is_a_file, out_is_a_link_to_a_model_folder, out_is_a_link_to_a_file, out_is_a_dangling_link,
        out_is_a_folder_of_user_files, out_has_another_programs_config, out_is_a_model_folder_with_a_user_file,
        out_is_a_model_folder_with_a_user_folder, out_is_a_model_folder_with_a_folder_named_like_finders_file,
        out_is_a_model_folder_with_a_link_named_like_finders_file, out_lists_a_user_file_as_a_tokenizer_file,
        out_has_a_tokenizer_file_that_is_a_link, out_is_under_a_file, out_name_is_too_long,
    ],
    ids=lambda make: make.__name__,
)
def test_output_that_may_hold_user_data_is_refused(make, overwrite, tiny_video, model_folder, tmp_path):
    out, words = make(tmp_path, model_folder)
    before = snapshot(tmp_path)
    with pytest.raises(OutputFolderError) as e:
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out, overwrite=overwrite)
    assert str(e.value).startswith(f"{out}: ") and words in str(e.value)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------
# Replacing a model folder
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "existing", ["model-folder", "model-folder-opened-in-finder", "model-folder-with-tokenizer-files", "empty-folder"]
)
def test_overwrite_replaces_a_model_folder_and_only_with_overwrite(existing, tiny_video, model_folder, tmp_path):
    out = model_folder
    if existing == "model-folder-opened-in-finder":
        (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    elif existing == "model-folder-with-tokenizer-files":
        _list_tokenizer_files(out, list(TOKENIZER_FILES))
        for name in TOKENIZER_FILES:
            (out / name).write_bytes(b"a tokenizer file")
    elif existing == "empty-folder":
        shutil.rmtree(out)
        out.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(OutputFolderError, match=re.escape(f"{out}: already exists (pass overwrite / --overwrite")):
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out, dtype="float16")
    assert snapshot(tmp_path) == before

    convert_flow(tiny_video.checkpoint, tiny_video.yaml, out, dtype="float16", overwrite=True)

    assert read_config(out)["dtype"] == "float16" and not leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_video.folder.iterdir())
    new, reference = read_model_folder(out), read_model_folder(tiny_video.folder)
    assert new.keys() == reference.keys()
    assert all(new[k].dtype == mx.float16 and mx.array_equal(new[k], reference[k].astype(mx.float16)) for k in new)


def fail_writing_a_shard(monkeypatch):
    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[write] Unable to write 1048576 bytes to file.")  # how MLX reports it

    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    return OutputFolderError, "cannot write the model folder: No space left on device"


def fail_writing_the_config(monkeypatch):
    write_text = Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    return OutputFolderError, f"cannot write the model folder: {os.strerror(errno.EIO)}"


def fail_renaming_into_place(monkeypatch):
    rename = os.rename

    def failing(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    return OutputFolderError, f"cannot write the model folder: {os.strerror(errno.EXDEV)}"


def interrupt_while_swapping(monkeypatch):
    rename = os.rename

    def interrupted(src, dst):
        rename(src, dst)
        if ".old-" in Path(dst).name:  # the old folder is aside, the new one not yet in place
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    return KeyboardInterrupt, None


@pytest.mark.parametrize(
    "fail", [fail_writing_a_shard, fail_writing_the_config, fail_renaming_into_place, interrupt_while_swapping],
    ids=lambda fail: fail.__name__,
)
def test_a_failed_overwrite_keeps_the_old_folder(fail, tiny_video, model_folder, tmp_path, monkeypatch):
    before = snapshot(tmp_path)
    error, words = fail(monkeypatch)
    with pytest.raises(error) as e:
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, model_folder, dtype="float16", overwrite=True)
    monkeypatch.undo()
    if words is not None:
        assert str(e.value) == f"{model_folder}: {words}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [True, False], ids=["model-folder-gets-a-user-file", "user-makes-the-folder"])
def test_output_is_checked_again_before_it_is_replaced(overwrite, tiny_video, tmp_path, monkeypatch):
    """The user may put files into OUT (or make it) while a long conversion runs: checked again at the swap."""
    import starflow_mlx.weights as weights

    out = tmp_path / "out"
    if overwrite:
        shutil.copytree(tiny_video.folder, out)
    write_files = weights._write_files

    def user_writes_meanwhile(*args):
        write_files(*args)
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("written during the conversion")

    monkeypatch.setattr(weights, "_write_files", user_writes_meanwhile)
    refused = re.escape(f"{out}: already exists and is not a starflow-mlx model folder")
    with pytest.raises(OutputFolderError, match=refused):
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "written during the conversion" and not leftovers(out)
    if overwrite:
        assert {k: v for k, v in snapshot(out).items() if k != "notes.txt"} == snapshot(tiny_video.folder)


# ----------------------------------------------------------------------------------------------------------------
# Locations that cannot be written: one error naming the folder, nothing left behind (created parents included)
# ----------------------------------------------------------------------------------------------------------------


def refuse_mkdir(code: int):
    def patch(monkeypatch):
        def refused(self, *args, **kwargs):
            raise OSError(code, os.strerror(code), str(self))

        monkeypatch.setattr(Path, "mkdir", refused)

    return patch


@pytest.mark.parametrize(
    "code, patch",
    [
        (errno.ENOSPC, lambda monkeypatch: fail_writing_a_shard(monkeypatch)),
        (errno.EROFS, refuse_mkdir(errno.EROFS)),
        (errno.EACCES, refuse_mkdir(errno.EACCES)),
        (errno.EPERM, refuse_mkdir(errno.EPERM)),
        (errno.ENAMETOOLONG, None),  # real: a path longer than the system's limit
    ],
    ids=["ENOSPC", "EROFS", "EACCES", "EPERM", "ENAMETOOLONG"],
)
def test_unwritable_location_is_one_error_and_leaves_nothing(code, patch, tiny_video, tmp_path, monkeypatch):
    out = tmp_path / "new" / "deeper" / "out"
    if patch is None:
        out = tmp_path.joinpath(*["y" * 200] * 25, "out")
    else:
        patch(monkeypatch)
    with pytest.raises(OutputFolderError) as e:
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)
    monkeypatch.undo()
    message = str(e.value)
    assert message.startswith(f"{out}: ") and message.endswith(os.strerror(code)) and "\n" not in message
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Conversions in a subprocess: a real write limit, signals, and what a killed run leaves
# ----------------------------------------------------------------------------------------------------------------

# Converts with the command line's ``main``; "writing" blocks after the first shard is written, "swapping" once the
# folder being replaced is moved aside; a blocked run writes its pid to the ready file. "fsize" limits the size
# of any file it writes (the write fails, as on a full disk, instead of killing the process).
CHILD = """
import os, resource, signal, sys, time
from pathlib import Path
import starflow_mlx.weights as weights
from starflow_mlx.cli import main

ready, stage, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

def block():
    ready.write_text(str(os.getpid()))
    time.sleep(120)

if stage == "writing":
    save = weights._save_shard
    def save_then_block(path, shard):
        save(path, shard)
        block()
    weights._save_shard = save_then_block
elif stage == "swapping":
    rename = os.rename
    def rename_then_block(src, dst):
        rename(src, dst)
        if ".old-" in os.fspath(dst):
            block()
    os.rename = rename_then_block
elif stage == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
sys.exit(main(argv))
"""


def start_conversion(ready: Path, stage: str, argv: list[str]) -> subprocess.Popen:
    """The command line converting in a bounded subprocess; for a blocking stage, returned once it is blocked."""
    proc = start_bounded(CHILD, ready, stage, *argv, imports=("starflow_mlx.cli", "starflow_mlx.weights"))
    deadline = time.monotonic() + 60
    while stage in ("writing", "swapping") and not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the conversion ended before blocking: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the conversion did not block within 60 s")
        time.sleep(0.05)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, list[str]]:
    result = finish_bounded(proc, timeout=60)
    return result.returncode, result.stderr.splitlines()


@pytest.mark.parametrize("case", ["dev-zero", "fifo"])
def test_a_wan_vae_source_that_is_neither_file_nor_folder(case, tmp_path):
    """Not "no such file": it exists. In a subprocess: a converter that read it would never end (or fill memory)."""
    path = Path("/dev/zero") if case == "dev-zero" else tmp_path / "Wan2.2_VAE.pth"
    if case == "fifo":
        os.mkfifo(path)
    out = tmp_path / "out"

    code, lines = finish(start_conversion(tmp_path / "ready", "plain", ["convert", "wan-vae", str(path), str(out)]))

    assert (code, lines) == (2, [f"error: {path}: not a regular file or folder"])
    assert not out.exists() and not leftovers(out)


def test_a_write_limit_is_one_error_and_leaves_nothing(tiny_video, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    code, lines = finish(start_conversion(tmp_path / "ready", "fsize", [*flow_argv(tiny_video), str(work / "out")]))
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {work / 'out'}: cannot write the model folder: [write] Unable to write")
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("stage", ["writing", "swapping"])
@pytest.mark.parametrize(
    "signum, code, line",
    [
        (signal.SIGTERM, 143, "error: terminated (SIGTERM); the partial output was removed"),
        (signal.SIGINT, 130, "error: interrupted (Ctrl-C); the partial output was removed"),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_mid_conversion_cleans_up(signum, code, line, stage, tiny_video, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    if stage == "swapping":
        shutil.copytree(tiny_video.folder, work / "out")
    before = snapshot(work)
    proc = start_conversion(tmp_path / "ready", stage, [*flow_argv(tiny_video), str(work / "out"), "--overwrite"])
    assert leftovers(work / "out")  # it is in the middle of its work

    proc.send_signal(signum)

    assert finish(proc) == (code, [line])
    assert snapshot(work) == before


def test_a_killed_writer_leaves_a_tmp_that_the_next_run_removes(tiny_video, tmp_path, caplog):
    out = tmp_path / "work" / "out"
    proc = start_conversion(tmp_path / "ready", "writing", [*flow_argv(tiny_video), str(out)])
    pid = int((tmp_path / "ready").read_text())
    proc.kill()
    assert finish(proc)[0] == -signal.SIGKILL
    [stale] = leftovers(out)
    assert re.fullmatch(rf"\.out\.tmp-{pid}-[0-9a-f]{{8}}", stale) and not out.exists()

    caplog.set_level(logging.WARNING)
    convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)

    assert f"{out.parent / stale}: removed, left behind by a killed run" in caplog.text
    assert not leftovers(out) and snapshot(out) == snapshot(tiny_video.folder)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_model_folder(a), read_model_folder(b)
    return wa.keys() == wb.keys() and all(mx.array_equal(wa[k], wb[k]) for k in wa)


def test_a_run_killed_while_swapping_gets_the_old_model_back(tiny_video, tmp_path, caplog):
    out = tmp_path / "work" / "out"
    convert_flow(tiny_video.checkpoint, tiny_video.yaml, out, dtype="bfloat16")
    old_model = snapshot(out)
    proc = start_conversion(tmp_path / "ready", "swapping", [*flow_argv(tiny_video), str(out), "--overwrite"])
    proc.kill()
    finish(proc)
    assert not out.exists() and [name[:9] for name in leftovers(out)] == [".out.old-", ".out.tmp-"]

    caplog.set_level(logging.WARNING)
    with pytest.raises(OutputFolderError, match="already exists"):  # the user's model is back, so not replaced
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)

    assert snapshot(out) == old_model and not leftovers(out)
    assert f"{out}: restored from .out.old-" in caplog.text and "removed, left behind" in caplog.text


def test_a_running_conversion_is_never_disturbed(tiny_video, tmp_path):
    out = tmp_path / "work" / "out"
    proc = start_conversion(tmp_path / "ready", "writing", [*flow_argv(tiny_video), str(out)])
    [running] = leftovers(out)
    during = snapshot(out.parent)

    with pytest.raises(OutputFolderError, match=f"another run is writing it \\({re.escape(running)}\\)"):
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)

    assert snapshot(out.parent) == during
    proc.terminate()
    assert finish(proc)[0] == 143 and not out.parent.exists()  # nor the folder it had created


def _model_copy(tiny_video, path: Path, complete: bool = True) -> None:
    shutil.copytree(tiny_video.folder, path)
    if not complete:  # what an interrupted deletion leaves
        next(path.glob("*.safetensors")).unlink()


def _mark(folder: Path, kind: str, pid: int = 4242, out: str = "out") -> None:
    """The marker of a conversion's folder, spelled out here: its content is what proves the folder ours."""
    (folder / MARKER_NAME).write_text(json.dumps({"written_by": "starflow-mlx", "kind": kind, "pid": pid, "out": out}))


@pytest.mark.parametrize(
    "leftover, out_exists, restored",
    [
        (".out.tmp-4242-0123abcd", False, False),
        (".out.old-4242-0123abcd", True, False),  # a finished run died deleting the folder it replaced
        (".out.old-4242-0123abcd", False, True),  # died between its two renames: the user's model comes back
        (".out.old-4242-0123abcd-incomplete", False, False),
    ],
    ids=["tmp", "old-beside-its-replacement", "old-complete", "old-incomplete"],
)
def test_leftovers_of_killed_runs_are_tidied(leftover, out_exists, restored, tiny_video, tmp_path, caplog):
    out = tmp_path / "out"
    complete = not leftover.endswith("-incomplete")
    leftover = leftover.removesuffix("-incomplete")
    _model_copy(tiny_video, tmp_path / leftover, complete)
    (tmp_path / leftover / ".DS_Store").write_bytes(b"finder")
    expected_out = snapshot(tmp_path / leftover)
    _mark(tmp_path / leftover, leftover[5:8])
    if out_exists:
        _model_copy(tiny_video, out)
        expected_out = snapshot(out)
    caplog.set_level(logging.WARNING)

    with pytest.raises(OutputFolderError, match="already exists") if restored or out_exists else nullcontext():
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)

    assert not leftovers(out)
    if restored or out_exists:
        assert snapshot(out) == expected_out  # the marker taken out of the folder put back
        assert (f"{out}: restored from {leftover}" in caplog.text) == restored
    else:
        assert f"{tmp_path / leftover}: removed, left behind by a killed run" in caplog.text
        assert _same_weights(out, tiny_video.folder)


def _user_folder(work: Path, name: str) -> list[str]:
    (work / name).mkdir()
    (work / name / "thesis.tex").write_text("the user's thesis")
    return [name]


def _user_file(work: Path, name: str) -> list[str]:
    (work / name).write_text("the user's notes")
    return []


def _model_copy_beside(work: Path, name: str, tiny_video) -> list[str]:
    _model_copy(tiny_video, work / name)
    return [name]


def _badly_marked(work: Path, **marker) -> list[str]:
    """A folder named like a killed run's tmp whose marker is not that of a conversion to OUT by the pid named."""
    folder = work / ".out.tmp-4242-0123abcd"
    folder.mkdir()
    (folder / "thesis.tex").write_text("the user's thesis")
    _mark(folder, **{"kind": "tmp", **marker})
    return [folder.name]


def _marker_elsewhere(work: Path, make_marker) -> list[str]:
    folder = work / ".out.tmp-4242-0123abcd"
    folder.mkdir()
    (work / "marked").mkdir()
    _mark(work / "marked", "tmp")
    make_marker(folder / MARKER_NAME, work / "marked" / MARKER_NAME)
    return [folder.name]


def _link_to_a_marked_folder(work: Path) -> list[str]:
    (work / "precious").mkdir()
    (work / "precious" / "a.txt").write_text("the user's data")
    _mark(work / "precious", "tmp")
    (work / ".out.tmp-4242-0123abcd").symlink_to(work / "precious")
    return []  # not a folder: never looked into, so not reported either


# Each makes, beside OUT, something of the user's that is named like a killed conversion's folder (or marked like
# one) and returns the names that the run must report as left alone (those it cannot rule out by name and type).
NOT_OURS = {
    "dated-backup-folder": lambda work, tiny: _user_folder(work, ".out.old-20240101")[1:],  # no pid: not even a name
    "backup-folder-named-with-a-pid": lambda work, tiny: _user_folder(work, ".out.old-4242-20240101"),
    "file-named-like-a-tmp": lambda work, tiny: _user_file(work, ".out.tmp-12345678"),
    "file-named-like-a-tmp-with-a-pid": lambda work, tiny: _user_file(work, ".out.tmp-4242-0123abcd"),
    "complete-model-copy-named-like-an-old": lambda work, tiny: _model_copy_beside(work, ".out.old-cafebabe", tiny)[1:],
    "complete-model-copy-named-with-a-pid": lambda work, tiny: _model_copy_beside(work, ".out.old-4242-cafebabe", tiny),
    "marker-for-another-output": lambda work, tiny: _badly_marked(work, out="other"),
    "marker-with-another-pid": lambda work, tiny: _badly_marked(work, pid=4243),
    "marker-of-the-other-kind": lambda work, tiny: _badly_marked(work, kind="old"),
    "marker-is-a-link": lambda work, tiny: _marker_elsewhere(work, lambda path, marker: path.symlink_to(marker)),
    "marker-is-a-folder": lambda work, tiny: _marker_elsewhere(work, lambda path, marker: path.mkdir()),
    "link-to-a-marked-folder": lambda work, tiny: _link_to_a_marked_folder(work),
}


@pytest.mark.parametrize("case", list(NOT_OURS))
def test_what_is_not_provably_a_leftover_of_ours_is_left_alone(case, tiny_video, tmp_path, caplog):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    reported = NOT_OURS[case](work, tiny_video)
    before = snapshot(work)
    caplog.set_level(logging.WARNING)

    convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)  # OUT is missing: nothing is "restored" into it

    assert _same_weights(out, tiny_video.folder) and MARKER_NAME not in os.listdir(out)
    assert {k: v for k, v in snapshot(work).items() if k.split(os.sep)[0] != "out"} == before
    for name in reported:
        assert f"{work / name}: left alone: named like what a killed run leaves, but not marked as one" in (
            caplog.text
        )
    assert caplog.text.count("left alone") == len(reported)  # once, although the output is checked twice
    assert "removed" not in caplog.text and "restored" not in caplog.text


def _fifo_marker(work: Path) -> None:
    (work / ".out.tmp-4242-0123abcd").mkdir()
    os.mkfifo(work / ".out.tmp-4242-0123abcd" / MARKER_NAME)


@pytest.mark.parametrize(
    "make, reported",
    [(lambda work: os.mkfifo(work / ".out.tmp-1-deadbeef"), False), (_fifo_marker, True)],
    ids=["fifo-named-like-a-tmp", "marker-is-a-fifo"],
)
def test_a_fifo_named_like_a_leftover_never_blocks_the_run(make, reported, tiny_video, tmp_path):
    """Opening a FIFO for reading waits for a writer: a conversion that opened one would hang (here: time out)."""
    work = tmp_path / "work"
    work.mkdir()
    make(work)
    before = snapshot(work)

    code, lines = finish(start_conversion(tmp_path / "ready", "plain", [*flow_argv(tiny_video), str(work / "out")]))

    assert code == 0 and lines[-1].startswith(f"wrote {work / 'out'} ")
    assert any("left alone" in line for line in lines) == reported
    assert {k: v for k, v in snapshot(work).items() if k.split(os.sep)[0] != "out"} == before


# ----------------------------------------------------------------------------------------------------------------
# Weights a dtype cannot hold, and weights that are not floating
# ----------------------------------------------------------------------------------------------------------------

KEY = "blocks.0.proj_in.weight"  # the same name in the checkpoint and in our folder


@pytest.mark.parametrize(
    "value, dtype, words",
    [
        (1e5, "float16", "has values up to 100000, beyond float16's largest 65504; use --dtype bfloat16 or float32"),
        (-7e4, "float16", "has values up to 70000, beyond float16's largest 65504; use --dtype bfloat16 or float32"),
        (3.4e38, "bfloat16", "has values up to 3.4e+38, beyond bfloat16's largest 3.38953e+38; use --dtype float32"),
        (float("inf"), "float32", "holds inf or NaN values; the checkpoint is damaged"),
        (float("-inf"), "float16", "holds inf or NaN values; the checkpoint is damaged"),
        (float("nan"), "bfloat16", "holds inf or NaN values; the checkpoint is damaged"),
    ],
    ids=["float16-overflow", "float16-negative-overflow", "bfloat16-overflow", "inf", "minus-inf", "nan"],
)
def test_weights_the_dtype_cannot_hold_are_refused(value, dtype, words, tiny_video, tmp_path):
    state = torch.load(tiny_video.checkpoint, weights_only=True)
    state[KEY][3, 1] = value
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as e:
        convert_flow(tmp_path / "m.pth", tiny_video.yaml, tmp_path / "out", dtype=dtype)
    assert str(e.value) == f"{tmp_path / 'm.pth'}: weight {KEY!r} {words}"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_casting_at_load_is_checked_too(tiny_video, tmp_path):
    state = torch.load(tiny_video.checkpoint, weights_only=True)
    state[KEY][0, 0] = 1e5
    torch.save(state, tmp_path / "m.pth")
    folder = convert_flow(tmp_path / "m.pth", tiny_video.yaml, tmp_path / "out")  # float32 holds it
    with pytest.raises(CheckpointError, match=f"{folder}: weight '{KEY}' has values up to 100000, beyond float16"):
        load_flow(folder, dtype=mx.float16)


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_integer_or_boolean_weights_are_refused(kind, dtype, tmp_path, request, capsys, caplog):
    src = source(kind, tmp_path, request)
    key = src.missing  # a floating weight the converter needs
    torch.save({**src.state, key: torch.ones_like(src.state[key], dtype=getattr(torch, dtype))}, src.weights)
    out = tmp_path / "out"

    code, errors, text = run_cli(["convert", kind, *src.argv, str(out)], capsys, caplog)

    assert code == 2 and len(errors) == 1 and "Traceback" not in text
    assert re.search(rf"{re.escape(repr(key))}.* dtype {dtype}\b", text)  # the reader may refuse it first
    assert not out.exists() and not leftovers(out)


# ----------------------------------------------------------------------------------------------------------------
# The command line: one error line, never a traceback
# ----------------------------------------------------------------------------------------------------------------


def _zip_that_is_not_a_checkpoint(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "notes.zip", "w") as z:
        z.writestr("notes.txt", "the user's notes")
    return tmp / "notes.zip"


def _text_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("the user's notes")
    return tmp / "notes.txt"


def _empty_file(tmp: Path) -> Path:
    (tmp / "empty.pth").write_bytes(b"")
    return tmp / "empty.pth"


def _empty_folder(tmp: Path) -> Path:
    (tmp / "folder").mkdir()
    return tmp / "folder"


# Each makes a path to give in place of the checkpoint (or model folder).
BAD_SOURCES = {
    "missing-source": lambda tmp: tmp / "nowhere",
    "text-file": _text_file,
    "empty-file": _empty_file,
    "empty-folder": _empty_folder,
    "zip-that-is-not-a-checkpoint": _zip_that_is_not_a_checkpoint,
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
@pytest.mark.parametrize("kind", list(SOURCES))
def test_cli_bad_source_is_one_error_line(kind, case, tmp_path, request, capsys, caplog):
    src = source(kind, tmp_path, request)
    bad = BAD_SOURCES[case](tmp_path)
    out = tmp_path / "out"
    before = snapshot(tmp_path)

    code, errors, text = run_cli(["convert", kind, str(bad), *src.argv[1:], str(out)], capsys, caplog)

    assert code == 2 and len(errors) == 1 and "Traceback" not in text
    assert str(bad) in errors[0]
    assert snapshot(tmp_path) == before


def _raise(error: BaseException):
    def raising(*args, **kwargs):
        raise error

    return raising


CLI_FAILURES = {
    # case: (extra arguments, what reading the checkpoint raises, exit status, the error line's words)
    "bad-dtype": (["--dtype", "float64"], None, 2, "argument --dtype: invalid choice: 'float64'"),
    "out-is-a-file": (["OUT_IS_A_FILE"], None, 2, "exists and is a file, not a model folder"),
    "unreadable-source": ([], PermissionError(errno.EACCES, "Permission denied", "/data/model.bin"), 2,
                          "error: /data/model.bin: Permission denied"),
    "out-of-memory": ([], MemoryError(), 2, "error: out of memory; convert with --dtype bfloat16"),
    "ctrl-c": ([], KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C); the partial output was removed"),
    "internal-error": ([], RuntimeError("boom"), 1,
                       "error: internal error: RuntimeError: boom (run with -v for the traceback)"),
}


@pytest.mark.parametrize("case", list(CLI_FAILURES))
@pytest.mark.parametrize("kind", list(SOURCES))
def test_cli_failure_is_one_error_line(kind, case, tmp_path, request, capsys, caplog, monkeypatch):
    extra, raised, expected_code, words = CLI_FAILURES[case]
    src = source(kind, tmp_path, request)
    out = tmp_path / "out"
    if extra == ["OUT_IS_A_FILE"]:
        out.write_text("the user's notes")
        extra = []
    if raised is not None:
        monkeypatch.setattr(f"starflow_mlx.convert.{CONVERTER_MODULES[kind]}.read_state_dict", _raise(raised))
    before = snapshot(tmp_path)

    code, errors, text = run_cli(["convert", kind, *src.argv, str(out), *extra], capsys, caplog)

    assert code == expected_code and len(errors) == 1 and "Traceback" not in text
    assert words in errors[0]
    assert snapshot(tmp_path) == before


def test_cli_verbose_shows_the_traceback_of_an_internal_error(tiny_video, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr("starflow_mlx.convert.flow.read_state_dict", _raise(RuntimeError("boom")))
    code, errors, text = run_cli(["-v", *flow_argv(tiny_video), str(tmp_path / "out")], capsys, caplog)
    assert code == 1 and errors == ["error: internal error: RuntimeError: boom (run with -v for the traceback)"]
    assert "Traceback" in text and "RuntimeError: boom" in text


def test_cli_quantizing_a_model_too_small_for_the_group_size(tmp_path, request, capsys, caplog):
    src = source("t5", tmp_path, request)  # every Linear input width is 64 or 96
    out = tmp_path / "out"
    code, errors, text = run_cli(
        ["convert", "t5", *src.argv, str(out), "--q-bits", "4", "--q-group-size", "128"], capsys, caplog
    )
    assert code == 2 and len(errors) == 1 and "Traceback" not in text
    assert errors[0].startswith(
        "error: cannot quantize: no Linear layer of this model has an input width that is a multiple of the group "
        "size 128"
    )
    assert not out.exists() and not leftovers(out)
