"""``starflow-mlx`` command line: ``starflow-mlx convert <kind> ...`` (generate and score come later)."""

from __future__ import annotations

import argparse
import logging
import sys

from .checkpoint import CheckpointError

log = logging.getLogger("starflow_mlx")


def build_parser() -> argparse.ArgumentParser:
    from .convert import flow, sd_vae, t5, wan_vae

    parser = argparse.ArgumentParser(prog="starflow-mlx", description="STARFlow / STARFlow-V in MLX")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    kinds = commands.add_parser("convert", help="convert released checkpoints into MLX model folders").add_subparsers(
        dest="kind", required=True
    )
    # Each converter registers ``convert <kind>`` and sets ``func`` to a callable taking the parsed arguments.
    for converter in (flow, t5, wan_vae, sd_vae):
        converter.add_parser(kinds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except (CheckpointError, FileExistsError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
