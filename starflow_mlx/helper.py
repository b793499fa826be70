"""A long-lived helper process that apps (Swift, through ``Foundation.Process``) drive over pipes.

    starflow-mlx helper        # or: python -m starflow_mlx.helper

Newline-delimited JSON: one request per line on stdin, one event per line on stdout, nothing else on stdout (logs
and anything a library prints go to stderr). The schema, versioned by ``PROTOCOL``, is ``schema/helper.schema.json``
in the package.

- A request: ``{"id": 7, "method": "generate", "params": {...}}``; ids are the app's (an integer or a string).
- Events: ``{"v": 1, "id": 7, "event": "accepted" | "progress" | "frame" | "result" | "error" | "cancelled", ...}``.
  Every request ends with exactly one ``result``, ``error`` or ``cancelled`` event of its id.
- ``hello``, ``cancel`` and ``shutdown`` are answered at once; ``load``, ``plan``, ``generate``, ``score`` and
  ``unload`` are jobs, run one at a time in arrival order (``accepted`` says it is queued, with how many are ahead).
- ``cancel`` (``{"target": ID}``) takes a queued job off the queue, or stops the running one at its next chunk
  boundary and deletes what it wrote (the video and its frame PNGs).
- A malformed line, an unknown method or bad parameters get an ``error`` event; the helper goes on serving. EOF on
  stdin and ``shutdown`` cancel what is queued or running, and the process exits 0.
- ``generate`` writes into the folder the app names (``out_dir``, which must exist): the clip (``name``, a plain
  file name) and, as frames stream out, one PNG per frame in ``<stem>.frames/``; a name that would resolve outside
  ``out_dir`` is refused.

This module consumes ``Pipeline.stream`` events, as the CLI does; generation itself is the pipeline's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

PROTOCOL = 1
MAX_LINE_BYTES = 1 << 20  # a request is parameters, never media
MAX_DEPTH = 16
MAX_ID_LENGTH = 256
MAX_QUEUED = 256  # jobs waiting: a flood of requests is refused, not buffered without end
METHODS = ("hello", "load", "plan", "generate", "score", "cancel", "unload", "shutdown")
JOBS = ("load", "plan", "generate", "score", "unload")
ERROR_CODES = ("parse_error", "invalid_request", "unknown_method", "bad_params", "not_loaded", "not_found",
               "path_refused", "queue_full", "duplicate_id", "load_failed", "job_failed", "internal")
SCHEMA = Path(__file__).with_name("schema") / "helper.schema.json"

log = logging.getLogger("starflow_mlx.helper")


class RequestError(Exception):
    """A request refused with an ``error`` event of ``code`` (one of ``ERROR_CODES``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class JobCancelled(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Lines in, events out
# ----------------------------------------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> tuple[Any, str, dict]:
    """(id, method, params) of one line, or ``RequestError`` (its ``id`` attribute set when the line had one)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("parse_error", f"the line is not UTF-8 (byte {e.start})") from None
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("parse_error", f"the line nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of too many digits
        raise RequestError("parse_error", f"the line is not JSON: {_first_line(e)}") from None
    if _depth(request) > MAX_DEPTH:
        raise RequestError("parse_error", f"the line nests deeper than {MAX_DEPTH} levels")
    if not isinstance(request, dict):
        raise RequestError("invalid_request", f"a request is a JSON object, got {type(request).__name__}")
    request_id = request.get("id")
    if (isinstance(request_id, bool) or not isinstance(request_id, (int, str))
            or (isinstance(request_id, int) and abs(request_id) > 2**53)
            or (isinstance(request_id, str) and not 0 < len(request_id) <= MAX_ID_LENGTH)):
        raise RequestError("invalid_request", "a request needs an id: an integer within ±2^53 or a string of 1 to "
                                              f"{MAX_ID_LENGTH} characters")
    try:
        unknown = set(request) - {"id", "method", "params"}
        if unknown:
            raise RequestError("invalid_request", f"unknown request field {sorted(unknown)[0]!r}")
        method, params = request.get("method"), request.get("params", {})
        if not isinstance(method, str):
            raise RequestError("invalid_request", "a request needs a method (a string)")
        if method not in METHODS:
            raise RequestError("unknown_method", f"unknown method {method[:64]!r}; methods: {', '.join(METHODS)}")
        if not isinstance(params, dict):
            raise RequestError("bad_params", f"params must be an object, got {type(params).__name__}")
    except RequestError as e:
        e.id = request_id
        raise
    return request_id, method, params


def _depth(value, limit: int = MAX_DEPTH + 1) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def _plain(value):
    """``value`` as strict JSON: numpy scalars and arrays as numbers and lists, paths as strings, NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)


class Events:
    """The protocol's output: one JSON object per line, whole lines only (one lock)."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def emit(self, request_id, event: str, **fields) -> None:
        line = json.dumps({"v": PROTOCOL, "id": request_id, "event": event, **_plain(fields)}, ensure_ascii=False,
                          allow_nan=False)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # the app closed our stdout: nothing left to tell it
                pass

    def error(self, request_id, code: str, message: str) -> None:
        self.emit(request_id, "error", code=code, message=message)


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


def _take(params: dict, spec: dict) -> dict:
    """``params`` checked against ``spec`` {name: (types, default)}; a missing name without a default is refused."""
    unknown = set(params) - set(spec)
    if unknown:
        raise RequestError("bad_params", f"unknown parameter {sorted(unknown)[0]!r}; parameters: {', '.join(spec)}")
    out = {}
    for name, (types, default) in spec.items():
        if name not in params:
            if default is _REQUIRED:
                raise RequestError("bad_params", f"missing parameter {name!r}")
            out[name] = default
            continue
        value = params[name]
        if value is None and default is None:
            out[name] = None
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise RequestError("bad_params", f"{name} must be {names}, got {type(value).__name__}")
        out[name] = value
    return out


_REQUIRED = object()
TEXT, INTEGER, NUMBER, FLAG, OBJECT, LIST = (str,), (int,), (int, float), (bool,), (dict,), (list,)


def _settings(settings: dict, method: str, own: tuple[str, ...]) -> dict:
    """``settings`` (``Settings`` fields, which the pipeline checks), refused where a key is one of the method's own
    parameters (it would reach the pipeline twice)."""
    clash = sorted(set(settings) & set(own))
    if clash:
        raise RequestError("bad_params", f"settings.{clash[0]} is not a setting; give it as a {method} parameter")
    return settings


def output_path(out_dir: str, name: str) -> Path:
    """``out_dir``/``name``, refused unless ``out_dir`` is an existing folder and ``name`` a plain file name that
    stays inside it (no separator, no ``..``, not a link pointing out)."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise RequestError("path_refused", f"out_dir {out_dir!r} is not an existing folder")
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255:
        raise RequestError("path_refused", f"name {name[:80]!r} must be a plain file name inside out_dir")
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise RequestError("path_refused", f"name {name[:80]!r} resolves outside out_dir {str(root)!r}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    id: Any
    method: str
    params: dict
    cancel: threading.Event = field(default_factory=threading.Event)


class Helper:
    """The state of one helper process: the loaded pipeline, the queue of jobs and the one running."""

    def __init__(self, events: Events):
        self.events = events
        self.pipeline = None
        self.model = None
        self.waiting: list[Job] = []  # the queue, in order
        self.running: Optional[Job] = None
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a job queued, or stopping
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self._work, name="starflow-helper-worker", daemon=True)

    # ---- the reader's side ----
    def handle_line(self, line: bytes) -> None:
        try:
            request_id, method, params = parse_request(line)
        except RequestError as e:
            self.events.error(getattr(e, "id", None), e.code, str(e))
            return
        try:
            if method == "hello":
                self.events.emit(request_id, "result", **self.hello(params))
            elif method == "cancel":
                self.events.emit(request_id, "result", **self.cancel(params))
            elif method == "shutdown":
                _take(params, {})
                self.stop()
                self.events.emit(request_id, "result", shutdown=True)
            else:
                self.submit(Job(request_id, method, params))
        except RequestError as e:
            self.events.error(request_id, e.code, str(e))

    def hello(self, params: dict) -> dict:
        import mlx.core as mx

        from . import __version__, memory, pipeline

        _take(params, {})
        limit, source = memory.default_limit()
        return {"protocol": PROTOCOL, "version": __version__, "mlx": mx.__version__, "methods": list(METHODS),
                "tasks": list(pipeline.TASKS), "loaded": self.model,
                "memory": {"backend": memory.default_backend(), "limit_bytes": limit, "limit_source": source,
                           "active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory()}}

    def submit(self, job: Job) -> None:
        with self.lock:
            if any(other.id == job.id for other in [*self.waiting, *filter(None, [self.running])]):
                raise RequestError("duplicate_id", f"a queued or running job has id {job.id!r} already")
            if len(self.waiting) >= MAX_QUEUED:
                raise RequestError("queue_full", f"{MAX_QUEUED} jobs are queued already; wait for some to finish")
            ahead = len(self.waiting) + (self.running is not None)
            self.waiting.append(job)
            # said before the worker can take it, so ``accepted`` always comes first
            self.events.emit(job.id, "accepted", method=job.method, ahead=ahead)
            self.changed.notify()

    def cancel(self, params: dict) -> dict:
        target = _take(params, {"target": ((int, str), _REQUIRED)})["target"]
        with self.lock:
            for job in self.waiting:
                if job.id == target:
                    self.waiting.remove(job)
                    job.cancel.set()
                    self.events.emit(job.id, "cancelled", method=job.method, running=False)
                    return {"target": target, "running": False}
            if self.running is not None and self.running.id == target:
                self.running.cancel.set()  # the worker says ``cancelled`` when it has stopped and cleaned up
                return {"target": target, "running": True}
        raise RequestError("not_found", f"no queued or running job has id {target!r}")

    def stop(self) -> None:
        """Cancel everything; the worker ends after the running job has stopped."""
        with self.lock:
            self.stopping.set()
            for job in self.waiting:
                job.cancel.set()
                self.events.emit(job.id, "cancelled", method=job.method, running=False)
            self.waiting.clear()
            if self.running is not None:
                self.running.cancel.set()
            self.changed.notify()

    # ---- the worker's side ----
    def _work(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting or self.stopping.is_set())
                if self.stopping.is_set():
                    return
                job = self.running = self.waiting.pop(0)
            try:
                outcome = getattr(self, "_" + job.method)(job)
                self.events.emit(job.id, "result", **outcome)
            except JobCancelled:
                self.events.emit(job.id, "cancelled", method=job.method, running=True)
            except RequestError as e:
                self.events.error(job.id, e.code, str(e))
            except ValueError as e:  # the pipeline's checks (settings, media, prompts): one line naming the field
                self.events.error(job.id, "bad_params", _first_line(e))
            except OSError as e:
                self.events.error(job.id, "job_failed", _first_line(e))
            except Exception as e:  # noqa: BLE001 -- the helper outlives any one job
                log.exception("job %r failed", job.id)
                self.events.error(job.id, "internal", f"{type(e).__name__}: {_first_line(e)}")
            finally:
                with self.lock:
                    self.running = None

    def _loaded(self):
        if self.pipeline is None:
            raise RequestError("not_loaded", "no model is loaded: send load first")
        return self.pipeline

    def _load(self, job: Job) -> dict:
        from .pipeline import Pipeline

        p = _take(job.params, {"model": (TEXT, None), "dtype": (TEXT, None), "q_bits": (INTEGER, None),
                               "low_memory": (FLAG, False)})
        self.pipeline = self.model = None
        try:
            pipeline = Pipeline.from_pretrained(p["model"], p["dtype"], q_bits=p["q_bits"],
                                                low_memory=p["low_memory"])
        except (ValueError, OSError) as e:
            raise RequestError("load_failed", _first_line(e)) from None
        self.pipeline, self.model = pipeline, p["model"] or "default"
        return {"model": self.model, "video": pipeline.video, "defaults": pipeline.settings().to_dict(),
                "record": pipeline.model_record()}

    def _unload(self, job: Job) -> dict:
        _take(job.params, {})
        self.pipeline = self.model = None
        import mlx.core as mx

        mx.clear_cache()
        return {"unloaded": True}

    def _plan(self, job: Job) -> dict:
        p = _take(job.params, {"task": (TEXT, "t2v"), "settings": (OBJECT, {}), "given_frames": (INTEGER, None)})
        settings = _settings(p["settings"], "plan", ("task", "given_frames", "backend"))
        plan = self._loaded().plan(p["task"], given_frames=p["given_frames"], **settings)
        return {"plan": plan.to_dict()}

    def _score(self, job: Job) -> dict:
        p = _take(job.params, {"media": (TEXT, _REQUIRED), "captions": (LIST, _REQUIRED), "seed": (INTEGER, 0),
                               "settings": (OBJECT, {})})
        if not p["captions"] or not all(isinstance(c, str) for c in p["captions"]):
            raise RequestError("bad_params", "captions must be a non-empty list of strings")
        settings = _settings(p["settings"], "score", ("media", "captions", "seed", "media_or_frames"))
        likelihood = self._loaded().log_likelihood(p["media"], p["captions"], seed=p["seed"], **settings)
        return {"captions": p["captions"], "bits_per_dim": likelihood.record["bits_per_dim"],
                "record": likelihood.record}

    def _generate(self, job: Job) -> dict:
        p = _take(job.params, {
            "prompt": (TEXT, _REQUIRED), "task": (TEXT, "t2v"), "out_dir": (TEXT, _REQUIRED), "name": (TEXT, None),
            "image": (TEXT, None), "video": (TEXT, None), "given_frames": (INTEGER, None), "given_from": (TEXT, "end"),
            "source_prompt": (TEXT, None), "strength": (NUMBER, None), "settings": (OBJECT, {}),
            "frames": (FLAG, True), "overwrite": (FLAG, False)})
        pipeline = self._loaded()
        task = p["task"]
        suffix = ".png" if task == "t2i" else ".mp4"
        if p["name"] is not None and not p["name"].lower().endswith(suffix):
            raise RequestError("bad_params", f"name {p['name'][:80]!r} must end in {suffix} for task {task}")
        path = output_path(p["out_dir"], p["name"] or f"{_file_stem(job.id)}{suffix}")
        frames_dir = path.with_name(path.stem + ".frames") if p["frames"] else None
        for existing in (path, frames_dir):
            if existing is not None and existing.exists() and not p["overwrite"]:
                raise RequestError("path_refused", f"{existing} exists (overwrite: true replaces it)")
        conditions = {k: p[k] for k in ("image", "video", "given_frames", "source_prompt", "strength")
                      if p[k] is not None}
        if p["given_from"] != "end":
            conditions["given_from"] = p["given_from"]
        settings = _settings(p["settings"], "generate", ("prompt", "task", "image", "video", "given_frames",
                                                         "given_from", "source_prompt", "strength"))
        events = pipeline.stream(p["prompt"], task, **conditions, **settings)  # checked before any work
        fps = None if task == "t2i" else pipeline.settings(**settings).fps
        if frames_dir is not None:
            if frames_dir.exists():  # overwrite: replaced; a link is refused by rmtree, nothing outside is touched
                shutil.rmtree(frames_dir)
            frames_dir.mkdir()
        try:
            result = self._consume(job, pipeline, events, path, fps, frames_dir, p["overwrite"])
        except BaseException:
            if frames_dir is not None:  # this job's folder, made above
                shutil.rmtree(frames_dir, ignore_errors=True)
            raise
        record = result.record
        return {"path": str(result.path), "frames_dir": None if frames_dir is None else str(frames_dir),
                "frames": result.frames,
                "seed": record["settings"]["seed"], "timings": record.get("timings"),
                "bits_per_dim": record.get("bits_per_dim"), "record": record}

    def _consume(self, job, pipeline, events, path: Path, fps: Optional[int], frames_dir: Optional[Path],
                 overwrite: bool):
        """The events of one generation: progress, each frame into the mp4 (``fps``; None: an image, written at
        the end) and, with ``frames_dir``, a PNG per frame as it comes. A failure or cancel leaves no mp4
        (``VideoWriter`` aborts)."""
        from . import media
        from .pipeline import FramesDecoded, Generated

        progress = _Progress(self.events, job.id, deep_block=pipeline.flow_config.num_blocks - 1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.closing(events))
            video = None if fps is None else stack.enter_context(media.VideoWriter(path, fps, overwrite=overwrite))
            for event in events:
                if job.cancel.is_set():
                    raise JobCancelled()
                progress.update(event)
                if isinstance(event, FramesDecoded):
                    for index, frame in enumerate(event.frames[0], start=event.start):
                        if video is not None:
                            video.write(frame)
                        if frames_dir is not None:
                            png = frames_dir / f"frame_{index:05d}.png"
                            _write_png(png, frame)
                            self.events.emit(job.id, "frame", index=index, total=event.total, path=str(png))
                if isinstance(event, Generated):
                    result = event.result
                    if video is not None:
                        written = video.close(result.record)
                    else:
                        written = media.write_image(path, result.frames[0][0], result.record, overwrite=overwrite)
                    return _Written(written, result.record, result.frames.shape[1])
        raise RuntimeError("the generation stream ended without a result")


@dataclass
class _Written:
    path: Path
    record: dict
    frames: int


def _file_stem(request_id) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(request_id))[:64]
    return f"job-{stem or 'x'}"


def _write_png(path: Path, frame) -> None:
    """One frame as a PNG, whole or not at all (a temporary name renamed into place)."""
    from PIL import Image

    from .media import to_uint8

    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(to_uint8(frame)).save(partial, format="PNG")
    os.replace(partial, path)


class _Progress:
    """``progress`` events from pipeline events: per stage, its units done of its total, and MLX's peak memory;
    one event per change of ``done`` (the deep block's chunks are many)."""

    def __init__(self, events: Events, request_id, deep_block: int):
        self.events, self.id, self.deep_block = events, request_id, deep_block
        self.stage, self.total, self.done = None, None, -1

    def update(self, event) -> None:
        from .pipeline import StageFinished, StageStarted
        from .sampler import ChunkSolved, FramesDenoised

        if isinstance(event, StageStarted):
            self.stage, self.total, self.done = event.stage, event.total, -1
            self._emit(0)
        elif isinstance(event, ChunkSolved) and self.stage == "sample" and event.block == self.deep_block:
            if self.total:
                self._emit(self.total * event.stop // event.total)
        elif isinstance(event, FramesDenoised) and self.stage == "denoise":
            self._emit(event.stop)
        elif isinstance(event, StageFinished):
            self._emit(self.total or 1, seconds=event.seconds)

    def _emit(self, done: int, **extra) -> None:
        import mlx.core as mx

        if done == self.done and not extra:
            return
        self.done = done
        self.events.emit(self.id, "progress", stage=self.stage, done=done, total=self.total,
                         peak_memory_bytes=mx.get_peak_memory(), **extra)


# ----------------------------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------------------------


def _read_lines(stream, handle: Callable[[bytes], None], too_long: Callable[[], None]) -> None:
    """Each line of ``stream`` (bytes) to ``handle``; a line over ``MAX_LINE_BYTES`` is skipped whole and reported."""
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_LINE_BYTES)
            too_long()
            continue
        if line.strip():
            handle(line)


def serve(stdin, stdout) -> int:
    """Serve requests from ``stdin`` (bytes) until EOF, ``shutdown`` or SIGTERM; events to ``stdout`` (text).
    Returns the exit status: 0, or 143 after SIGTERM (the running job cancelled and cleaned up first)."""
    events = Events(stdout)
    helper = Helper(events)
    terminated = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # an app ends its helper with SIGTERM (``Process.terminate()``): stop as on EOF, cleaning up, not mid-write
        signal.signal(signal.SIGTERM, lambda *_: (terminated.set(), helper.stop()))
    helper.worker.start()
    reader = threading.Thread(target=_read_lines, daemon=True, name="starflow-helper-reader", args=(
        stdin, helper.handle_line,
        lambda: events.error(None, "parse_error", f"a line longer than {MAX_LINE_BYTES} bytes was skipped")))
    reader.start()
    while reader.is_alive() and not helper.stopping.is_set():
        reader.join(0.1)
    if not helper.stopping.is_set():  # EOF
        helper.stop()
    helper.worker.join()
    return 143 if terminated.is_set() else 0


def main(argv=None) -> int:
    """The protocol on the process's own stdout, which nothing else may write to: fd 1 is pointed at stderr (so a
    library's print or a C library's write lands there), and the protocol keeps a duplicate of the original."""
    import argparse

    argparse.ArgumentParser(prog="starflow-mlx helper", description=__doc__.split("\n\n")[0]).parse_args(argv)
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    code = serve(sys.stdin.buffer, protocol)
    # After ``shutdown`` the reader thread may still be blocked reading stdin; finalizing the interpreter around it
    # aborts in native code (a joinable thread destroyed), so the process ends here, every job finished or cleaned.
    protocol.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
