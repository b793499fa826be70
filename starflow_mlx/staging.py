"""Outputs written atomically: into a hidden temporary beside the target, marked as ours and locked while the run
lives, then renamed into place; and what killed runs left beside a target, tidied only when provably ours.

Shared by every writer of outputs: model and pipeline folders (``weights``, which knows what a model folder of ours
holds and so what may be replaced) and media files (``media``: an mp4 or PNG and its ``.json`` sidecar).

- ``staged_folder(out, check, is_complete, error)``: the block writes a folder ``.OUT.tmp-<pid>-<random>`` beside
  ``out``; at its end an existing ``out`` is moved aside to ``.OUT.old-<pid>-<random>``, the new folder renamed into
  place and the old one deleted. Any failure removes what the call made and puts the old folder back.
- ``StagedFiles(targets, overwrite, error, drafts)``: one hidden ``.NAME.tmp-<pid>-<random>`` file per target (plus
  draft files, removed at the end), renamed onto the targets together by ``put_in_place`` (a file is replaced by
  one rename, so nothing is ever moved aside); ``discard``, or the interpreter's exit, removes them.
- ``tidy_leftovers(target, error, is_complete)``: what runs that were killed (SIGKILL, a crash, power loss) left
  beside ``target``; both writers call it first, and a target a live run is writing is refused.
- ``check_name_fits``, ``check_file_target``, ``real_path``, ``is_regular_file``: the checks of a target's path.

What proves a hidden folder or file ours is its marker (``MARKER_NAME``: the kind, the pid in the name and the
target's name, as JSON), written before anything else and removed last: inside a folder, and beside a file as the
file's name plus ``MARKER_NAME``. The marker is also what the run holds locked (``flock``, which the system drops
when the process dies, however it dies): that is how a killed run's leftovers are told from a live run's. Anything
named like a leftover but not marked as one is the user's (a ``.models.old-2024...`` backup, a copy of a model
folder) and is never removed, restored or opened; only regular files are ever opened (never a link, nor a FIFO,
which would block), and never waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .config import parse_json_object

log = logging.getLogger(__name__)

MARKER_NAME = ".starflow-mlx-staging"
MAX_MARKER_BYTES = 4096
# The longest suffixes of the hidden names beside a target (Linux pids are below 2**22): a folder's
# ".OUT.old-<pid>-<random>", a file's marker ".NAME.tmp-<pid>-<random>.starflow-mlx-staging".
FOLDER_SUFFIX_LONGEST = ".old-4194304-00000000"
FILE_SUFFIX_LONGEST = ".tmp-4194304-00000000" + MARKER_NAME


# ----------------------------------------------------------------------------------------------------------------
# Checking a target's path
# ----------------------------------------------------------------------------------------------------------------


def real_path(path: Path, error: type[ValueError]) -> Path:
    """``path`` with every link and ``..`` resolved; a loop of links, or anything else that stops the system
    resolving it, is one ``error`` naming ``path``."""
    try:
        return path.resolve()
    except RuntimeError:  # how Python 3.11 reports a loop
        raise error(f"{path}: cannot be followed: it, or a folder above it, is a loop of symbolic links") from None
    except OSError as e:
        raise error(f"{path}: cannot be followed: {e.strerror or e}") from None


def is_regular_file(path: Path) -> bool:
    """A regular file itself, not a link to one (nor a folder, FIFO or device)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def check_name_fits(target: Path, folder: Path, error: type[ValueError], is_folder: bool) -> None:
    """``target``'s name leaves room, in ``folder``'s file system, for the suffixes of the hidden names beside it."""
    what = "folder" if is_folder else "file"
    name_max = _name_max(folder)
    longest = FOLDER_SUFFIX_LONGEST if is_folder else FILE_SUFFIX_LONGEST
    limit = name_max - len(os.fsencode("." + longest))  # the hidden name's leading dot and suffix
    if len(os.fsencode(target.name)) > limit:
        raise error(
            f"{target}: the {what} name is too long ({len(os.fsencode(target.name))} bytes; at most {limit} fit "
            f"here, with the suffix of the hidden temporary {what}, in this file system's {name_max})"
        )


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_file_target(target: Path, overwrite: bool, error: type[ValueError]) -> None:
    """What a written file may replace: nothing but an existing regular file, and that only with ``overwrite``;
    never a symbolic link (whose target would be replaced behind the user's back) or a folder."""
    if not target.parent.is_dir():
        raise error(f"{target}: the folder {target.parent} does not exist")
    check_name_fits(target, target.parent, error, is_folder=False)
    if target.is_symlink():
        raise error(f"{target}: is a symbolic link; name the file itself (a link is never followed to replace its "
                    "target)")
    if target.is_dir():
        raise error(f"{target}: is a folder; name a file")
    if target.exists() and not is_regular_file(target):
        raise error(f"{target}: exists and is not a regular file")
    if target.exists() and not overwrite:
        raise error(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")


# ----------------------------------------------------------------------------------------------------------------
# Markers and their locks
# ----------------------------------------------------------------------------------------------------------------


def _marker(kind: str, pid: int, target: Path) -> dict:
    """What the marker of a ``kind`` ("tmp" or "old") made by process ``pid`` for ``target`` holds."""
    return {"written_by": "starflow-mlx", "kind": kind, "pid": pid, "out": target.name}


def _write_marker(marker: Path, kind: str, target: Path, error: type[ValueError], new: bool = True) -> int:
    """Write the marker file ``marker`` and return its descriptor, locked: the lock lasts until it is closed.
    ``new``: created here, never an existing file; otherwise (a folder of ours about to be moved aside) one that a
    killed run left in it is reused. Locked before its content is written, so that a marked file is never a live
    run's unlocked one; opened without following a link or waiting. A marker whose writing fails is removed."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_EXCL if new else 0)
    fd = os.open(marker, flags, 0o644)
    locked = False
    try:
        _lock(fd, target, error)
        locked = True
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_marker(kind, os.getpid(), target)).encode())
    except BaseException:
        os.close(fd)
        if new or locked:  # never another run's marker
            marker.unlink(missing_ok=True)
        raise
    return fd


@contextlib.contextmanager
def _marked(marker: Path, kind: str, target: Path, error: type[ValueError], new: bool = True) -> Iterator[None]:
    """``_write_marker`` for the block; the marker itself stays (the caller removes it when its folder is done)."""
    fd = _write_marker(marker, kind, target, error, new)
    try:
        yield
    finally:
        os.close(fd)


def _lock(fd: int, target: Path, error: type[ValueError]) -> None:
    """An exclusive lock on ``fd``'s file (a marker of a run writing ``target``), or ``error`` at once when another
    run holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise error(f"{target}: another run is writing it; wait for it to finish") from None


def _read_marker(marker: Path) -> tuple[bool, dict | None]:
    """Whether the marker file ``marker`` is locked by a live run, and what it holds (None when it is not a
    readable JSON object of at most ``MAX_MARKER_BYTES``). Anything but a regular file is neither: never opened."""
    if not is_regular_file(marker):
        return False, None
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False, None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the check: not ours
            return False, None
        try:
            _lock(fd, marker, ValueError)
        except ValueError:
            return True, None
        text = os.read(fd, MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return False, parse_json_object(text.decode("utf-8"), marker) if len(text) <= MAX_MARKER_BYTES else None
    except ValueError:  # not UTF-8, not JSON: not ours
        return False, None


# ----------------------------------------------------------------------------------------------------------------
# What killed runs leave beside a target
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leftover:
    """A hidden folder or file beside a target named like one a run writing it makes, and where its marker is."""

    path: Path
    kind: str  # "tmp" (being written) or "old" (a folder moved aside)
    pid: int
    marker: Path
    is_folder: bool


def _hidden_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _leftovers(target: Path) -> list[_Leftover]:
    """What is named like the hidden folders and file markers of a run writing ``target``, newest first: real
    folders named ``.OUT.(tmp|old)-<pid>-<random>`` and regular files named ``.NAME.tmp-<pid>-<random>`` plus
    ``MARKER_NAME`` (a file's marker). Nothing else is ever looked into: a run never makes a link or a FIFO there."""
    if not target.parent.is_dir():
        return []
    hidden = rf"\.{re.escape(target.name)}\.(tmp|old)-(\d{{1,7}})-[0-9a-f]{{8}}"
    names = re.compile(hidden), re.compile(rf"({hidden}){re.escape(MARKER_NAME)}")
    found = []
    with os.scandir(target.parent) as entries:
        for entry in entries:
            leftover = _leftover(entry, *names)
            if leftover:
                found.append((entry.stat(follow_symlinks=False).st_mtime, leftover))
    return [leftover for _, leftover in sorted(found, key=lambda f: f[0], reverse=True)]


def _leftover(entry: os.DirEntry, folder_name: re.Pattern, marker_name: re.Pattern) -> _Leftover | None:
    path, folder, marker = Path(entry.path), folder_name.fullmatch(entry.name), marker_name.fullmatch(entry.name)
    if folder and entry.is_dir(follow_symlinks=False):
        return _Leftover(path, folder[1], int(folder[2]), path / MARKER_NAME, is_folder=True)
    if marker and marker[2] == "tmp" and entry.is_file(follow_symlinks=False):  # only a folder is moved aside
        return _Leftover(path.with_name(marker[1]), "tmp", int(marker[3]), path, is_folder=False)
    return None


def tidy_leftovers(
    target: Path, error: type[ValueError], is_complete: Callable[[Path], bool] = lambda folder: False
) -> None:
    """Tidy what runs writing ``target`` that were killed left beside it; a target that a live run is writing (it
    holds its markers locked) is refused with ``error`` and nothing is touched: two runs replacing one target could
    lose what it held.

    Only what holds the marker of a run writing ``target`` (its kind, the pid in its name and ``target``'s name) is
    ours; anything else is the user's, whatever its name, and is left alone (and logged once). A temporary is
    incomplete by definition: removed, its marker last. A folder moved aside is what ``target`` held before: if
    ``target`` is missing (the run died between its two renames) and ``is_complete`` accepts it, it is put back,
    since it is the user's and the run that would have replaced it never finished; otherwise it is what a finished
    run replaced: removed.
    """
    leftovers = [(leftover, *_read_marker(leftover.marker)) for leftover in _leftovers(target)]
    running = [leftover.path.name for leftover, locked, _ in leftovers if locked]
    if running:
        raise error(f"{target}: another run is writing it ({', '.join(running)}); wait for it to finish or stop it")
    for leftover, _, content in leftovers:
        if content != _marker(leftover.kind, leftover.pid, target):
            _report_once(leftover.path)
        elif leftover.kind == "old" and not os.path.lexists(target) and is_complete(leftover.path):
            os.rename(leftover.path, target)
            (target / MARKER_NAME).unlink()
            log.warning("%s: restored from %s, where a killed run had moved it aside", target, leftover.path.name)
        elif _remove_ours(leftover):
            log.warning("%s: removed, left behind by a killed run", leftover.path)


# What was named like a leftover but not ours and reported: a writer checks its target more than once.
_reported: set[Path] = set()


def _report_once(path: Path) -> None:
    if path not in _reported:
        _reported.add(path)
        log.warning("%s: left alone: named like what a killed run leaves, but not marked as one", path)


def _remove_ours(leftover: _Leftover) -> bool:
    """Remove a marked leftover, its marker last, so that a removal cut short leaves it still marked as ours. A
    file's temporary is removed only as the regular file a run makes (else reported, and False)."""
    if leftover.is_folder:
        _remove_folder(leftover.path)
        return True
    if os.path.lexists(leftover.path) and not is_regular_file(leftover.path):
        _report_once(leftover.path)
        return False
    leftover.path.unlink(missing_ok=True)
    leftover.marker.unlink()
    return True


def _remove_folder(folder: Path) -> None:
    """Remove a folder of ours, its marker last."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name == MARKER_NAME:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    (folder / MARKER_NAME).unlink(missing_ok=True)
    folder.rmdir()


# ----------------------------------------------------------------------------------------------------------------
# A folder target
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(
    out: Path, check: Callable[[Path], None], is_complete: Callable[[Path], bool], error: type[ValueError]
) -> Iterator[Path]:
    """The temporary folder in which to write what becomes the folder ``out`` (an absolute path), put in place when
    the block ends without an error.

    First what killed runs left beside ``out`` is tidied (``tidy_leftovers``, with ``is_complete``) and ``check``
    runs: it raises when ``out`` exists and must not be replaced. The block writes into ``.OUT.tmp-<pid>-<random>``
    beside it (the missing parent folders created first), marked and locked; at the end ``check`` runs again (the
    block took a while), an existing ``out`` is marked and moved aside to ``.OUT.old-<pid>-<random>``, the new
    folder renamed into place and the old one deleted, its marker last. Any failure (Ctrl-C and SIGTERM included)
    removes the temporary folder and the parent folders this call created and puts the old folder back, so ``out``
    is either complete or as it was. The system's errors are raised as they are (``OSError``), and ``error`` for a
    target another run is writing.
    """
    tidy_leftovers(out, error, is_complete)
    check(out)
    missing_parents = [p for p in reversed(out.parents) if not p.exists()]
    tmp = _hidden_path(out, "tmp")
    try:
        for folder in missing_parents:
            folder.mkdir()
        tmp.mkdir()
        with _marked(tmp / MARKER_NAME, "tmp", out, error):
            yield tmp
            _put_folder_in_place(tmp, out, check, error)
    except BaseException:
        if tmp.is_dir():
            with contextlib.suppress(OSError):
                _remove_folder(tmp)
        for folder in reversed(missing_parents):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _put_folder_in_place(tmp: Path, out: Path, check: Callable[[Path], None], error: type[ValueError]) -> None:
    """Rename ``tmp`` to ``out`` and take its marker out. An existing ``out``, checked again, is marked and moved
    aside (locked, so that a concurrent run does not take it for a leftover), put back if the rename fails, and
    deleted once the new folder is in place."""
    check(out)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        (out / MARKER_NAME).unlink()
        return
    old = _hidden_path(out, "old")
    with _marked(out / MARKER_NAME, "old", out, error, new=False):
        try:
            os.rename(out, old)
            os.rename(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.rename(old, out)
            raise
        finally:
            (out / MARKER_NAME).unlink(missing_ok=True)  # the old folder's (put back) or the new one's
        with contextlib.suppress(OSError):
            _remove_folder(old)


# ----------------------------------------------------------------------------------------------------------------
# File targets
# ----------------------------------------------------------------------------------------------------------------


class _MarkedFile:
    """A hidden temporary file beside ``target``, made after its marker, which stays locked until ``release``."""

    def __init__(self, target: Path, error: type[ValueError]):
        self.path = _hidden_path(target, "tmp")
        self.marker = self.path.with_name(self.path.name + MARKER_NAME)
        self._fd = _write_marker(self.marker, "tmp", target, error)
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        except BaseException:
            self.release()
            raise

    def remove(self) -> None:
        """Remove the temporary, then its marker; nothing once released (the temporary is the target now)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            self.release()

    def release(self) -> None:
        """Remove the marker, and with it the lock: the temporary is gone, renamed onto its target or removed."""
        if self._fd is not None:
            self.marker.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class StagedFiles:
    """Files written atomically together: one hidden temporary per target in ``paths`` (in the order of
    ``targets``), then ``drafts`` more (beside the first target) for intermediate results; ``put_in_place``
    renames each temporary onto its target and removes the drafts, ``discard`` removes them all (so does the
    interpreter's exit before either).

    Each target is checked (``check_file_target``: an existing regular file is replaced only with ``overwrite``)
    and what killed runs left beside it tidied (``tidy_leftovers``) before anything is made; a target another run
    is writing is refused with ``error``, and so is any other problem with a target. The system's errors are raised
    as they are (``OSError``), after the temporaries made are removed.
    """

    def __init__(self, targets: Sequence[Path], overwrite: bool, error: type[ValueError], drafts: int = 0):
        self.targets, self.overwrite, self.error = tuple(targets), overwrite, error
        for target in self.targets:
            check_file_target(target, overwrite, error)
            tidy_leftovers(target, error)
        self._files: list[_MarkedFile] = []
        self._finalizer = weakref.finalize(self, _remove_all, self._files)
        try:
            for target in (*self.targets, *[self.targets[0]] * drafts):
                self._files.append(_MarkedFile(target, error))
        except BaseException:
            self.discard()
            raise
        self.paths = tuple(file.path for file in self._files)

    def put_in_place(self) -> None:
        """Every target checked again (one created meanwhile is not replaced either), then each temporary renamed
        onto its target."""
        for target in self.targets:
            check_file_target(target, self.overwrite, self.error)
        for file, target in zip(self._files, self.targets):
            os.replace(file.path, target)
            file.release()
        self.discard()  # the drafts

    def discard(self) -> None:
        self._finalizer()


def _remove_all(files: list[_MarkedFile]) -> None:
    for file in files:
        with contextlib.suppress(OSError):
            file.remove()
