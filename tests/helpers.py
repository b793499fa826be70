"""Helpers shared by the tests: error measures, array conversion, the official fixtures by name, and running a case
in a subprocess under resource limits."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFLOW_SHARED", REPO.parent / "shared"))


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (links not followed): a file's bytes, a link's target, "folder", or the type of
    anything else (a FIFO is never opened)."""
    tree = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                tree[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                tree[key] = "folder" if stat.S_ISDIR(mode) else path.read_bytes()
            else:
                tree[key] = ("special", stat.S_IFMT(mode))
    return tree


def maxerr(a, b) -> float:
    """Largest absolute difference, computed in float64 (MLX, torch and numpy arrays alike)."""
    return float(np.abs(to_numpy(a) - to_numpy(b)).max())


def to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def to_torch(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


@dataclass(frozen=True)
class OfficialFixture:
    """Numbers computed by Apple's implementation (``../shared/fixtures/<name>``): its README says what each is."""

    name: str
    root: Path
    io: dict

    @property
    def checkpoint(self) -> Path:
        return self.root / "model.pth"

    @property
    def yaml(self) -> Path:
        return self.root / "config.yaml"


def official_fixture(name: str) -> OfficialFixture:
    """Load an official fixture; skipped when ``../shared`` is absent, except under CI (``CI`` set), where a
    missing fixture is a failure: the parity tests must never be skipped silently there."""
    root = SHARED / "fixtures" / name
    if not root.is_dir():
        message = f"official fixture {name!r} not found at {root} (set STARFLOW_SHARED)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    return OfficialFixture(name, root, dict(np.load(root / "io.npz")))


def refusal(call, error: type[BaseException] = ValueError) -> str:
    """The message of the ``error`` that ``call()`` raises, asserted to be one line."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------
# A case in a subprocess under resource limits
# ----------------------------------------------------------------------------------------------------------------

# The cases that could crash, hang or eat memory on a regression (bombs, deep nesting, out-of-bounds reads, fuzzed
# files, conversions that are signalled) run in a child process, so that a regression fails the test instead of
# killing pytest, swapping the machine or hanging the run:
# - RLIMIT_AS: the child measures its own address space after importing MLX and numpy (which reserve a lot of it,
#   more on machines with more cores) and the modules the case names, then allows ``extra_memory`` more. A bounded
#   case needs a few MB beyond its imports; a regression dies of MemoryError instead of swapping the machine.
#   Measured rather than fixed, so that the margin is the same wherever the tests run. Where /proc is missing
#   (macOS, which does not enforce RLIMIT_AS anyway) no address-space limit is set.
# - RLIMIT_CPU and the timeout turn a hang into a failure.
# - The child reports its own peak RSS (VmHWM; ru_maxrss would include the forking parent's on Linux) in a last
#   stderr line, which ``finish_bounded`` takes off into ``peak_rss_kib``.
BOUNDED_EXTRA_MEMORY = 512 << 20
BOUNDED_CPU_SECONDS = 60
BOUNDED_TIMEOUT = 120
PEAK_MARKER = "bounded-peak-rss-kib"

_PROLOGUE = """\
import atexit as _atexit, importlib as _importlib, resource as _resource, sys as _sys
for _name in {imports!r}:
    _importlib.import_module(_name)
def _status_kib(_field):
    try:
        with open("/proc/self/status") as _f:
            return next(int(_l.split()[1]) for _l in _f if _l.startswith(_field + ":"))
    except OSError:
        return None
_vm = _status_kib("VmSize")
if _vm is not None:
    _limit = _vm * 1024 + {extra_memory}
    _resource.setrlimit(_resource.RLIMIT_AS, (_limit, _limit))
_resource.setrlimit(_resource.RLIMIT_CPU, ({cpu}, {cpu}))
def _report_peak():
    _peak = _status_kib("VmHWM")
    if _peak is None:
        _peak = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss // (1024 if _sys.platform == "darwin" else 1)
    print({marker!r}, _peak, file=_sys.stderr, flush=True)
_atexit.register(_report_peak)
"""


class BoundedRun(subprocess.CompletedProcess):
    """A finished bounded child: its exit status, stdout, stderr (without the peak line) and ``peak_rss_kib``
    (None when it was killed before reporting)."""

    def __init__(self, args, returncode, stdout, stderr, peak_rss_kib):
        super().__init__(args, returncode, stdout, stderr)
        self.peak_rss_kib = peak_rss_kib


def start_bounded(script: str, *args, extra_memory: int = BOUNDED_EXTRA_MEMORY, cpu: int = BOUNDED_CPU_SECONDS,
                  imports: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -c script *args`` in the repository, under the limits above (address space measured after importing
    MLX, numpy and ``imports``, plus ``extra_memory`` bytes; ``cpu`` seconds), stdout and stderr piped as text."""
    prologue = _PROLOGUE.format(imports=("mlx.core", "numpy", *imports), extra_memory=int(extra_memory), cpu=int(cpu),
                                marker=PEAK_MARKER)
    return subprocess.Popen([sys.executable, "-c", prologue + textwrap.dedent(script), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_bounded(proc: subprocess.Popen, timeout: float = BOUNDED_TIMEOUT) -> BoundedRun:
    """Wait for a child of ``start_bounded``; one that runs past ``timeout`` seconds is killed and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the bounded subprocess did not end within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    lines = err.splitlines(keepends=True)
    peak = None
    if lines and lines[-1].startswith(PEAK_MARKER + " "):
        peak = int(lines.pop().split()[1])
    return BoundedRun(proc.args, proc.returncode, out, "".join(lines), peak)


def run_bounded(script: str, *args, timeout: float = BOUNDED_TIMEOUT, **limits) -> BoundedRun:
    """``start_bounded`` then ``finish_bounded``: the finished child, whatever its exit status."""
    return finish_bounded(start_bounded(script, *args, **limits), timeout)
