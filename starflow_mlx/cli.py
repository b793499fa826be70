"""``starflow-mlx`` command line: ``starflow-mlx convert <kind> ...`` (generate and score come later).

Every failure is one line, ``error: ...``, never a traceback: exit status 2 for what the user can fix (a source, an
argument, the output folder, a full disk, too little memory), 130 after Ctrl-C and 143 after SIGTERM (the partial
output removed first), and 1 for an internal error, whose traceback ``-v`` shows.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading

log = logging.getLogger("starflow_mlx")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, like Ctrl-C, so that the same cleanup runs."""


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line too (argparse prints the whole usage above its error)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .convert import flow, pipeline, sd_vae, t5, wan_vae

    parser = _Parser(prog="starflow-mlx", description="STARFlow / STARFlow-V in MLX")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the traceback of an internal error"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    kinds = commands.add_parser("convert", help="convert released checkpoints into MLX model folders").add_subparsers(
        dest="kind", required=True
    )
    # Each converter registers ``convert <kind>`` and sets ``func`` to a callable taking the parsed arguments.
    for converter in (flow, t5, wan_vae, sd_vae, pipeline):
        converter.add_parser(kinds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    with _sigterm_raises():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except Terminated:
        log.error("error: terminated (SIGTERM); the partial output was removed")
        return 143
    except KeyboardInterrupt:
        log.error("error: interrupted (Ctrl-C); the partial output was removed")
        return 130
    except ValueError as e:  # CheckpointError, OutputFolderError, bad arguments: each names what is wrong
        log.error("error: %s", e)
        return 2
    except OSError as e:  # a source that cannot be read
        log.error("error: %s", f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e)
        return 2
    except MemoryError:
        log.error("error: out of memory; convert with --dtype bfloat16 (or quantize with --q-bits 8) to need less")
        return 2
    except Exception as e:
        log.error(
            "error: internal error: %s: %s (run with -v for the traceback)", type(e).__name__, e, exc_info=args.verbose
        )
        return 1
    return 0


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises ``Terminated``; Python can only install handlers in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
