"""File targets of ``staging``: hidden temporaries, their markers and locks, and what a killed writer left.

Folder targets (model and pipeline folders) are tested through the converters in ``test_hostile_outputs`` and
``test_pipeline_folder``; media files through their writers in ``test_media``. Here ``StagedFiles`` is driven
directly: what is named like a temporary but not provably ours is never deleted, a live writer's temporaries are
left alone, a killed writer's are removed by the next write, and a FIFO is never opened.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest

from starflow_mlx.staging import MARKER_NAME, StagedFiles
from tests.helpers import finish_bounded, snapshot, start_bounded

PID = 4242
TEMP = f".out.mp4.tmp-{PID}-0123abcd"  # named as a writer of out.mp4 with pid 4242 names its temporary


class Refused(ValueError):
    """The error class the tests hand to staging: its refusals must come as this class."""


def _marker(**changes) -> bytes:
    """The marker a writer of out.mp4 with pid 4242 writes beside its temporary, spelled out (what proves it ours)."""
    return json.dumps({"written_by": "starflow-mlx", "kind": "tmp", "pid": PID, "out": "out.mp4", **changes}).encode()


def write(target: Path, data: bytes = b"new", overwrite: bool = False) -> None:
    staged = StagedFiles([target], overwrite, Refused)
    staged.paths[0].write_bytes(data)
    staged.put_in_place()


def hidden(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------
# What is named like a temporary but not provably ours
# ----------------------------------------------------------------------------------------------------------------


def _temp_without_marker(work: Path) -> list[str]:
    (work / TEMP).write_bytes(b"the user's file")
    return []  # a writer makes its marker first: a temporary without one was never a writer's


def _badly_marked(**changes):
    def make(work: Path) -> list[str]:
        (work / TEMP).write_bytes(b"the user's file")
        (work / (TEMP + MARKER_NAME)).write_bytes(_marker(**changes) if changes else b"")
        return [TEMP]

    return make


def _marker_not_json(work: Path) -> list[str]:
    (work / TEMP).write_bytes(b"the user's file")
    (work / (TEMP + MARKER_NAME)).write_bytes(b"\xff not json")
    return [TEMP]


def _marker_is_a_link(work: Path) -> list[str]:
    (work / TEMP).write_bytes(b"the user's file")
    (work / "marker").write_bytes(_marker())
    (work / (TEMP + MARKER_NAME)).symlink_to(work / "marker")
    return []  # a writer never makes a link there: not even looked at


def _marker_is_a_folder(work: Path) -> list[str]:
    (work / TEMP).write_bytes(b"the user's file")
    (work / (TEMP + MARKER_NAME)).mkdir()
    return []


def _temp_is_a_folder(work: Path) -> list[str]:
    (work / TEMP).mkdir()
    (work / TEMP / "thesis.tex").write_text("the user's thesis")
    (work / (TEMP + MARKER_NAME)).write_bytes(_marker())
    return [TEMP]  # the marker says a file: a folder there is not what the writer made


def _temp_is_a_link(work: Path) -> list[str]:
    (work / "precious").write_bytes(b"the user's file")
    (work / TEMP).symlink_to(work / "precious")
    (work / (TEMP + MARKER_NAME)).write_bytes(_marker())
    return [TEMP]


NOT_OURS = {
    "temp-without-marker": _temp_without_marker,
    "marker-for-another-file": _badly_marked(out="other.mp4"),
    "marker-with-another-pid": _badly_marked(pid=PID + 1),
    "marker-of-a-moved-aside-folder": _badly_marked(kind="old"),
    "marker-written-by-another-program": _badly_marked(written_by="someone"),
    "marker-empty": _badly_marked(),
    "marker-not-json": _marker_not_json,
    "marker-is-a-link": _marker_is_a_link,
    "marker-is-a-folder": _marker_is_a_folder,
    "temp-is-a-folder": _temp_is_a_folder,
    "temp-is-a-link-to-a-user-file": _temp_is_a_link,
}


@pytest.mark.parametrize("case", list(NOT_OURS))
def test_what_is_not_provably_a_temporary_of_ours_is_never_deleted(case, tmp_path, caplog):
    reported = NOT_OURS[case](tmp_path)
    before = snapshot(tmp_path)
    caplog.set_level(logging.WARNING)

    write(tmp_path / "out.mp4")

    assert (tmp_path / "out.mp4").read_bytes() == b"new"
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "out.mp4"} == before
    for name in reported:
        assert f"{tmp_path / name}: left alone: named like what a killed run leaves, but not marked as one" in (
            caplog.text
        )
    assert caplog.text.count("left alone") == len(reported) and "removed" not in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Live and killed writers
# ----------------------------------------------------------------------------------------------------------------


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    target = tmp_path / "out.mp4"
    live = StagedFiles([target], False, Refused, drafts=1)
    live.paths[0].write_bytes(b"being written")
    during = snapshot(tmp_path)
    assert len(during) == 4  # the temporary and the draft, each with its marker

    with pytest.raises(Refused, match=rf"^{target}: another run is writing it \(\.out\.mp4\.tmp-{os.getpid()}-"):
        write(target)

    assert snapshot(tmp_path) == during
    live.put_in_place()
    assert os.listdir(tmp_path) == ["out.mp4"] and target.read_bytes() == b"being written"


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from starflow_mlx.staging import StagedFiles
staged = StagedFiles([Path(sys.argv[1])], False, ValueError, drafts=1)
for path in staged.paths:
    path.write_bytes(b"half-written")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path, caplog):
    target = tmp_path / "out.mp4"
    result = finish_bounded(start_bounded(KILLED_WRITER, target, imports=("starflow_mlx.staging",)))
    assert result.returncode == -signal.SIGKILL
    left = hidden(tmp_path)
    assert len(left) == 4 and sum(name.endswith(MARKER_NAME) for name in left) == 2
    pid = int(left[0].split("-")[1])
    user_file = tmp_path / f".out.mp4.tmp-{pid}-deadbeef"  # the user's, named like the killed writer's
    user_file.write_bytes(b"the user's file")
    caplog.set_level(logging.WARNING)

    write(target)

    assert sorted(os.listdir(tmp_path)) == [user_file.name, "out.mp4"]
    assert target.read_bytes() == b"new" and user_file.read_bytes() == b"the user's file"
    for name in (name for name in left if not name.endswith(MARKER_NAME)):  # the temporary and the draft
        assert f"{tmp_path / name}: removed, left behind by a killed run" in caplog.text
    assert caplog.text.count("removed, left behind") == 2


def test_a_target_made_meanwhile_is_not_replaced_and_nothing_is_left(tmp_path):
    target = tmp_path / "out.mp4"
    staged = StagedFiles([target, tmp_path / "out.mp4.json"], False, Refused)
    target.write_bytes(b"the user's video, saved meanwhile")

    with pytest.raises(Refused, match=rf"^{target}: already exists \(pass overwrite=True / --overwrite"):
        staged.put_in_place()
    staged.discard()

    assert snapshot(tmp_path) == {"out.mp4": b"the user's video, saved meanwhile"}


def test_a_name_without_room_for_the_markers_name_is_refused(tmp_path):
    target = tmp_path / ("x" * 230 + ".mp4")
    with pytest.raises(Refused, match=r"the file name is too long \(234 bytes; at most 212 fit here"):
        write(target)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# FIFOs: opening one for reading waits for a writer, so a run that opened one would hang
# ----------------------------------------------------------------------------------------------------------------

WRITER = """
import logging, sys
from pathlib import Path
from starflow_mlx.staging import StagedFiles
logging.basicConfig(level=logging.WARNING, format="%(message)s")
staged = StagedFiles([Path(sys.argv[1])], False, ValueError)
staged.paths[0].write_bytes(b"new")
staged.put_in_place()
print("written")
"""


def _fifo_marker(work: Path) -> bool:
    (work / TEMP).write_bytes(b"the user's file")
    os.mkfifo(work / (TEMP + MARKER_NAME))
    return False  # not a regular file: not even looked at


def _fifo_temp(work: Path) -> bool:
    os.mkfifo(work / TEMP)
    (work / (TEMP + MARKER_NAME)).write_bytes(_marker())
    return True  # marked, but not the regular file a writer makes: reported, kept


@pytest.mark.parametrize("make", [_fifo_marker, _fifo_temp], ids=["marker-is-a-fifo", "temp-is-a-fifo"])
def test_a_fifo_named_like_a_temporary_or_marker_is_never_opened(make, tmp_path):
    reported = make(tmp_path)
    before = snapshot(tmp_path)

    result = finish_bounded(start_bounded(WRITER, tmp_path / "out.mp4", imports=("starflow_mlx.staging",)), 60)

    assert (result.returncode, result.stdout) == (0, "written\n"), result.stderr
    assert ("left alone" in result.stderr) == reported
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "out.mp4"} == before
