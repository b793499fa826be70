"""Accuracy of the shipped shapes model on the conditioned tasks (BENCHMARKS.md), on held-out combinations:

- edit (``(v2v)``): a rendered clip of a training caption edited to a held-out caption one attribute away (colour or
  direction: the shapes VAE renders every shape as a blob, so shape edits are trained but not measurable);
- inversion editing: the same cases by exact inversion (forward under the source caption, sampled back under the
  target), at each ``--strength``;
- last frame (``(last)``): the clip ends where the given image has the object, with its colour, moving as captioned;
- extension (``(extend)``): the first 9 frames of a clip extended to 17; the new frames keep the object and its
  direction, and the caption's colour or the one the VAE gives the true continuation (also: the caption's alone).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_shapes_tasks.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from starflow_mlx import Pipeline  # noqa: E402
from tests.reference.shapes import HELD_OUT  # noqa: E402
from tests.shapes_quality import edit_accuracy, extension_accuracy, last_frame_accuracy  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--strength", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    seeds = range(args.seeds)
    pipeline = Pipeline.from_pretrained(args.model)
    runs = {
        "edit": lambda: edit_accuracy(pipeline, seeds),
        "last frame": lambda: last_frame_accuracy(pipeline, HELD_OUT, seeds),
        "extension": lambda: extension_accuracy(pipeline, HELD_OUT, seeds),
        "extension, caption colour": lambda: extension_accuracy(pipeline, HELD_OUT, seeds, vae_colour=False),
        **{f"inversion strength {s:g}": (lambda s=s: edit_accuracy(pipeline, seeds, method="inversion", strength=s))
           for s in args.strength},
    }
    figures = {}
    for name, run in runs.items():
        start = time.perf_counter()
        accuracy = run()
        seconds = (time.perf_counter() - start) / accuracy.total
        figures[name] = {"correct": accuracy.correct, "total": accuracy.total, "seconds_per_clip": seconds}
        print(f"{name:24s} {accuracy.correct}/{accuracy.total} ({accuracy.rate:.0%})  {seconds:.2f} s/clip", flush=True)
        for case in accuracy.analyses:
            if not case.correct:
                print(f"    missed: {case.caption!r} ({case.detail}): colour {case.analysis.colour}, direction "
                      f"{case.analysis.direction}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
