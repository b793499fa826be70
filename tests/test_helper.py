"""``starflow-mlx helper`` driven as an app drives it: a subprocess, JSON lines on its stdin and stdout. Every line
it writes is checked against the shipped schema (``starflow_mlx/schema/helper.schema.json``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starflow_mlx import helper as helper_module
from starflow_mlx import media

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads(helper_module.SCHEMA.read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
PROMPT = "a red square moving right"
QUICK = {"frames": 9, "seed": 1}
TIMEOUT = 120


class HelperProcess:
    """One helper subprocess: requests in, every stdout line parsed and schema-checked into ``lines``."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "starflow_mlx.cli", "helper", *args], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[dict] = []
        self.ended = False
        self.changed = threading.Condition()
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            event = json.loads(raw)  # every stdout line is one JSON object: a non-protocol line fails here
            VALIDATOR.validate(event)
            with self.changed:
                self.lines.append(event)
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def _drain_stderr(self):
        self.stderr = self.proc.stderr.read()

    def send(self, request) -> int:
        """Sends ``request`` (an object, or raw bytes); returns the count of lines out before it."""
        with self.changed:
            mark = len(self.lines)
        data = request if isinstance(request, bytes) else (json.dumps(request) + "\n").encode()
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return mark

    def wait_for(self, found, since: int = 0):
        """The first value of ``found(events after since)`` that is not None, waiting for more lines as needed."""
        deadline = time.time() + TIMEOUT
        with self.changed:
            while True:
                value = found(self.lines[since:])
                if value is not None:
                    return value
                assert not self.ended, f"the helper ended: {self.stderr[-2000:]!r}"
                assert time.time() < deadline, f"nothing found in {TIMEOUT} s; lines: {self.lines[since:][-5:]}"
                self.changed.wait(timeout=1)

    def until(self, request_id, final=("result", "error", "cancelled")) -> list[dict]:
        """The events of ``request_id`` up to and including its first ``final`` one."""
        def found(lines):
            mine = [e for e in lines if e["id"] == request_id]
            ends = [i for i, e in enumerate(mine) if e["event"] in final]
            return mine[: ends[0] + 1] if ends else None
        return self.wait_for(found)

    def next_error(self, since: int) -> dict:
        return self.wait_for(lambda lines: next((e for e in lines if e["event"] == "error"), None), since)

    def call(self, request_id, method: str, **params) -> list[dict]:
        self.send({"id": request_id, "method": method, "params": params})
        return self.until(request_id)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        return self.proc.returncode


@pytest.fixture(scope="module")
def helper():
    process = HelperProcess()
    [loaded] = [e for e in process.call("load", "load") if e["event"] == "result"]
    assert loaded["model"] == "default" and loaded["video"] is True
    yield process
    assert process.close() == 0


def _answer(events: list[dict]) -> dict:
    assert events[-1]["event"] == "result", events[-1]
    return events[-1]


def _error(events: list[dict]) -> dict:
    assert events[-1]["event"] == "error", events[-1]
    return events[-1]


def _alive(helper: HelperProcess, request_id="alive") -> None:
    assert _answer(helper.call(request_id, "hello"))["protocol"] == helper_module.PROTOCOL


# ----------------------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------------------


def test_hello_says_versions_capabilities_and_memory(helper):
    hello = _answer(helper.call(1, "hello"))
    assert hello["protocol"] == 1 and hello["methods"] == list(helper_module.METHODS)
    assert "edit" in hello["tasks"] and hello["loaded"] == "default"
    assert hello["memory"]["limit_bytes"] > 0 and hello["memory"]["backend"] in ("cpu", "gpu")


def test_generate_streams_progress_and_frames_then_the_result(helper, tmp_path):
    events = helper.call("gen", "generate", prompt=PROMPT, out_dir=str(tmp_path), name="clip.mp4", settings=QUICK)
    assert events[0] == {"v": 1, "id": "gen", "event": "accepted", "method": "generate", "ahead": 0}
    result = _answer(events)
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    assert stages[0] == "text" and "sample" in stages and stages[-1] == "decode"
    assert all(e["peak_memory_bytes"] > 0 for e in events if e["event"] == "progress")
    frames = [e for e in events if e["event"] == "frame"]
    assert [f["index"] for f in frames] == list(range(9)) and {f["total"] for f in frames} == {9}
    # each frame was announced once its PNG was whole, before the result
    assert all(Path(f["path"]).parent == tmp_path / "clip.frames" for f in frames)
    assert result["path"] == str(tmp_path / "clip.mp4") and result["frames"] == 9 and result["seed"] == 1
    assert result["record"]["prompt"] == PROMPT and result["bits_per_dim"] == result["record"]["bits_per_dim"]
    clip = media.read_video(result["path"], (64, 64), 9).frames
    first = media.read_image(frames[0]["path"], (64, 64))
    assert np.abs(clip[0] - first).mean() < 0.05  # the PNG is the clip's frame (the mp4 is lossy)


def test_plan_and_score(helper, tmp_path):
    plan = _answer(helper.call("plan", "plan", task="edit", settings={"kv_bits": 8}))["plan"]
    assert plan["request"]["task"] == "edit" and plan["request"]["kv_bits"] == 8 and plan["peak_bytes"] > 0
    clip = _answer(helper.call("src", "generate", prompt=PROMPT, out_dir=str(tmp_path), frames=False,
                               settings={"seed": 2}))
    assert clip["frames_dir"] is None and not list(tmp_path.glob("*.frames"))
    scored = _answer(helper.call("score", "score", media=clip["path"], captions=[PROMPT, "a red square moving left"]))
    assert len(scored["bits_per_dim"]) == 2 and scored["bits_per_dim"][0] < scored["bits_per_dim"][1]


def test_every_task_runs_through_the_helper(helper, tmp_path):
    source = _answer(helper.call("t2v", "generate", prompt=PROMPT, out_dir=str(tmp_path), frames=False))["path"]
    image = str(tmp_path / "last.png")
    media.write_image(image, media.read_video(source, (64, 64), 17).frames[-1].transpose(1, 2, 0))
    cases = {"edit": {"video": source}, "last": {"image": image}, "extend": {"video": source, "given_frames": 9},
             "inversion": {"video": source, "source_prompt": PROMPT, "strength": 0.2}}
    for task, conditions in cases.items():
        result = _answer(helper.call(task, "generate", prompt="a blue square moving right", task=task,
                                     out_dir=str(tmp_path), frames=False, **conditions))
        assert result["record"]["task"] == task and Path(result["path"]).exists()


def test_jobs_queue_in_order_and_a_queued_job_can_be_cancelled(helper, tmp_path):
    for n in range(3):
        helper.send({"id": f"q{n}", "method": "generate",
                     "params": {"prompt": PROMPT, "out_dir": str(tmp_path), "frames": False, "settings": QUICK}})
    helper.send({"id": "c", "method": "cancel", "params": {"target": "q2"}})
    answers = {request_id: helper.until(request_id) for request_id in ("q0", "q1", "q2", "c")}
    assert [answers[f"q{n}"][0]["ahead"] for n in range(3)] == [0, 1, 2]
    assert answers["q2"][-1] == {"v": 1, "id": "q2", "event": "cancelled", "method": "generate", "running": False}
    assert _answer(answers["c"]) ["running"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-q0.mp4", "job-q0.mp4.json", "job-q1.mp4",
                                                           "job-q1.mp4.json"]


def test_cancel_stops_the_running_job_and_deletes_its_output(helper, tmp_path):
    helper.send({"id": "long", "method": "generate", "params": {
        "prompt": PROMPT, "out_dir": str(tmp_path), "settings": {"frames": 41, "jacobi": False}}})
    helper.until("long", final=("frame",))  # cancel once frames are on disk
    helper.send({"id": "stop", "method": "cancel", "params": {"target": "long"}})
    events = helper.until("long")
    assert events[-1] == {"v": 1, "id": "long", "event": "cancelled", "method": "generate", "running": True}
    assert _answer(helper.until("stop"))["running"] is True
    assert list(tmp_path.iterdir()) == []  # neither the mp4 nor any frame PNG is left
    _alive(helper)


def test_a_duplicate_id_and_a_full_queue_are_refused(helper, tmp_path):
    helper.send({"id": "slow", "method": "generate", "params": _generate_params(
        tmp_path, settings={"frames": 41, "jacobi": False}, frames=False)})
    helper.until("slow", final=("accepted",))
    duplicate = _error(helper.call("slow", "plan"))
    assert duplicate["code"] == "duplicate_id"
    for n in range(helper_module.MAX_QUEUED):
        helper.send({"id": f"plan-{n}", "method": "plan"})
    full = _error(helper.call("one-too-many", "plan"))
    assert full["code"] == "queue_full"
    helper.call("stop-slow", "cancel", target="slow")
    helper.wait_for(lambda lines: next((e for e in lines if e["id"] == "slow" and e["event"] == "cancelled"), None))
    assert all(_answer(helper.until(f"plan-{n}"))["plan"] for n in range(helper_module.MAX_QUEUED))


# ----------------------------------------------------------------------------------------------------------------
# Refusals: an error event, and the helper goes on serving
# ----------------------------------------------------------------------------------------------------------------

BAD_LINES = {
    "not-json": (b"{nope\n", "parse_error"),
    "not-utf8": (b"\xff\xfe{}\n", "parse_error"),
    "nan": (b'{"id": 1, "method": "hello", "params": {"x": NaN}}\n', "parse_error"),
    "array": (b"[1, 2]\n", "invalid_request"),
    "no-id": (b'{"method": "hello"}\n', "invalid_request"),
    "bool-id": (b'{"id": true, "method": "hello"}\n', "invalid_request"),
    "huge-id": (b'{"id": 1e400, "method": "hello"}\n', "invalid_request"),
    "deep": (b'{"id": 1, "method": "hello", "params": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "parse_error"),
    "extra-field": (b'{"id": 1, "method": "hello", "x": 1}\n', "invalid_request"),
    "unknown-method": (b'{"id": 1, "method": "explode"}\n', "unknown_method"),
    "params-list": (b'{"id": 1, "method": "load", "params": []}\n', "bad_params"),
    "hello-params": (b'{"id": 1, "method": "hello", "params": {"x": 1}}\n', "bad_params"),
    "cancel-nothing": (b'{"id": 1, "method": "cancel", "params": {"target": "none"}}\n', "not_found"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_malformed_line_is_an_error_event_and_the_helper_goes_on(helper, case):
    line, code = BAD_LINES[case]
    error = helper.next_error(helper.send(line))
    assert error["event"] == "error" and error["code"] == code, error
    _alive(helper)


def test_a_huge_line_is_skipped_whole(helper):
    error = helper.next_error(helper.send(
        b'{"id": 1, "method": "hello", "params": {"x": "' + b"a" * (helper_module.MAX_LINE_BYTES + 10) + b'"}}\n'))
    assert error["code"] == "parse_error" and "longer than" in error["message"]
    _alive(helper)


DROP = object()


def _generate_params(tmp_path, **params):
    merged = {"prompt": PROMPT, "out_dir": str(tmp_path), "settings": QUICK, **params}
    return {k: v for k, v in merged.items() if v is not DROP}


BAD_JOBS = {
    "missing-prompt": ({"prompt": DROP}, "bad_params", "missing parameter 'prompt'"),
    "prompt-number": ({"prompt": 3}, "bad_params", "prompt must be str, got int"),
    "unknown-parameter": ({"steps": 3}, "bad_params", "unknown parameter 'steps'"),
    "unknown-setting": ({"settings": {"cfg": 3}}, "bad_params", "cfg"),
    "bad-setting": ({"settings": {"frames": -4}}, "bad_params", "frames"),
    "setting-is-a-parameter": ({"settings": {"task": "edit"}}, "bad_params", "settings.task is not a setting"),
    "strength-string": ({"strength": "1"}, "bad_params", "strength must be int or float, got str"),
    "frames-flag-number": ({"frames": 1}, "bad_params", "frames must be bool, got int"),
    "missing-video": ({"task": "edit"}, "bad_params", "needs a video"),
    "missing-file": ({"task": "edit", "video": "/nonexistent/clip.mp4"}, "bad_params", "/nonexistent/clip.mp4"),
    "dot-dot": ({"name": "../escape.mp4"}, "path_refused", "plain file name"),
    "absolute": ({"name": "/tmp/escape.mp4"}, "path_refused", "plain file name"),
    "no-folder": ({"out_dir": "/nonexistent/folder"}, "path_refused", "not an existing folder"),
    "name-of-another-kind": ({"name": "clip.mov"}, "bad_params", "name 'clip.mov' must end in .mp4 for task t2v"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_generate_parameters_are_an_error_event(helper, tmp_path, case):
    params, code, words = BAD_JOBS[case]
    error = _error(helper.call(case, "generate", **_generate_params(tmp_path, **params)))
    assert error["code"] == code and words in error["message"], error
    assert list(tmp_path.iterdir()) == []
    _alive(helper)


def test_a_link_out_of_the_folder_is_refused(helper, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "clip.mp4").symlink_to(outside / "clip.mp4")
    error = _error(helper.call("link", "generate", **_generate_params(folder, name="clip.mp4")))
    assert error["code"] == "path_refused" and "outside out_dir" in error["message"]
    assert list(outside.iterdir()) == []


def test_an_existing_output_is_refused_unless_overwrite(helper, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"mine")
    error = _error(helper.call("exists", "generate", **_generate_params(tmp_path, name="clip.mp4")))
    assert error["code"] == "path_refused" and (tmp_path / "clip.mp4").read_bytes() == b"mine"


# 60 cases in every run; STARFLOW_FUZZ_EXAMPLES=N runs a longer campaign (figures in BENCHMARKS.md)
@settings(max_examples=int(os.environ.get("STARFLOW_FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                 lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                   max_size=4), max_leaves=20)
    .map(lambda value: (json.dumps(value) + "\n").encode()),
    st.fixed_dictionaries({"id": st.integers() | st.text(max_size=10), "method": st.sampled_from(helper_module.METHODS),
                           "params": st.dictionaries(st.text(max_size=12), st.integers() | st.text(max_size=5),
                                                     max_size=3)})
    .map(lambda value: (json.dumps(value) + "\n").encode()),
))
def test_random_input_never_crashes_the_helper_or_corrupts_later_answers(fuzzed_helper, line):
    """Random bytes, random JSON and random requests (cancel and shutdown excluded from the last: they would act):
    every line out is schema-valid JSON (``HelperProcess._read``), and the next hello is answered correctly."""
    if b'"shutdown"' in line or b'"cancel"' in line or b'"load"' in line or b'"unload"' in line:
        return
    fuzzed_helper.send(line.replace(b"\n", b" ") + b"\n")
    _alive(fuzzed_helper, f"alive-{time.monotonic_ns()}")
    assert fuzzed_helper.proc.poll() is None


@pytest.fixture(scope="module")
def fuzzed_helper():
    process = HelperProcess()
    yield process
    assert process.close() == 0
    assert not [e for e in process.lines if e["event"] == "error" and e["code"] == "internal"], "an internal error"


# ----------------------------------------------------------------------------------------------------------------
# Shutting down
# ----------------------------------------------------------------------------------------------------------------


def test_eof_shuts_down_cleanly_and_leaves_no_child(tmp_path):
    process = HelperProcess()
    process.call("load", "load")
    process.send({"id": "job", "method": "generate", "params": _generate_params(tmp_path, settings={"frames": 41})})
    process.until("job", final=("progress",))
    children = [int(pid) for task in Path(f"/proc/{process.proc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    assert process.close() == 0  # EOF: the running job is cancelled and cleaned up, then the process exits
    assert process.until("job")[-1] == {"v": 1, "id": "job", "event": "cancelled", "method": "generate",
                                        "running": True}
    assert list(tmp_path.iterdir()) == []
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_sigterm_cancels_cleans_up_and_exits_143(tmp_path):
    process = HelperProcess()
    process.call("load", "load")
    process.send({"id": "job", "method": "generate", "params": _generate_params(tmp_path, settings={"frames": 41})})
    process.until("job", final=("frame",))
    process.proc.terminate()
    assert process.proc.wait(timeout=60) == 143
    assert process.until("job")[-1]["event"] == "cancelled"
    assert list(tmp_path.iterdir()) == []


def test_shutdown_answers_then_exits_even_with_stdin_open():
    process = HelperProcess()
    assert _answer(process.call("bye", "shutdown"))["shutdown"] is True
    assert process.proc.wait(timeout=60) == 0


def test_stdout_carries_protocol_lines_only():
    """Whatever else writes to stdout while the helper serves (Python's print, a native write to fd 1) lands on
    stderr."""
    noisy = subprocess.run(
        [sys.executable, "-c", "import os; from starflow_mlx import helper\n"
         "hello = helper.Helper.hello\n"
         "def noisy_hello(self, params):\n"
         "    print('noise'); os.write(1, b'more noise\\n'); return hello(self, params)\n"
         "helper.Helper.hello = noisy_hello; helper.main([])"],
        input=b'{"id": 1, "method": "hello"}\n', capture_output=True, cwd=REPO, timeout=60)
    assert noisy.returncode == 0, noisy.stderr[-2000:]
    assert [json.loads(line)["id"] for line in noisy.stdout.decode().splitlines()] == [1]
    assert b"noise" in noisy.stderr and b"more noise" in noisy.stderr


def test_the_schema_is_a_valid_draft_2020_12_schema_shipped_in_the_package():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert helper_module.SCHEMA.is_file()
    assert "schema/*.json" in (REPO / "pyproject.toml").read_text()
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate({"v": 1, "id": 1, "event": "progress", "stage": "text"})  # the schema does refuse
