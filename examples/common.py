"""What every example shares: the command line (``--model``, ``--out``, ``--seed``, ``--dtype``), loading the
pipeline, saving a result as mp4 or PNG with its record, and turning a user error into one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from starflow_mlx import Pipeline, media


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser for an example whose module docstring is ``doc``; ``--out`` is its output file."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the caption to generate from")
    p.add_argument("--model", default=None,
                   help="a converted pipeline folder or its hub repo id (default: the small model shipped in the package)")
    p.add_argument("--out", required=True, type=Path, help="the output file (.mp4 for a video, .png for an image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="cast the weights, e.g. float32 (default: as stored)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=None, help="quantize the flow and T5 as they load")
    return p


def load(args: argparse.Namespace) -> Pipeline:
    return Pipeline.from_pretrained(args.model, dtype=args.dtype, q_bits=args.q_bits)


def save(result, out: Path, row: int = 0) -> Path:
    """Sample ``row`` of a ``Generation``: an mp4 at the settings' fps, or a PNG for one frame; the record goes
    into the file's metadata and its ``.json`` sidecar."""
    frames = result.frames[row]
    if frames.shape[0] == 1:
        return media.write_image(out, frames[0], result.record)
    return media.write_video(out, frames, result.record["settings"]["fps"], result.record)


def run(main) -> None:
    """Run ``main()``; a bad argument or file (the library's ``ValueError``) is one line on stderr, exit 2."""
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
