"""Figures of the shipped shapes model (BENCHMARKS.md): generation time per clip and prompt accuracy for the
sequential inverse and Jacobi at several thresholds, bits/dim on training and held-out captions, the likelihood
ranking of true against wrong captions, best of N, and the 8-bit and 4-bit versions.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_shapes.py [--seeds 2] [--model DIR]

Accuracy is on the twelve held-out caption combinations (never seen in training) x ``--seeds`` seeds; a clip counts
when its moving blob has the caption's colour and moves in its direction (``tests.reference.shapes.analyse``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from starflow_mlx import Pipeline  # noqa: E402
from tests.reference.shapes import HELD_OUT, TRAIN_CAPTIONS  # noqa: E402
from tests.shapes_quality import best_of, likelihood_ranking, mean_bits_per_dim, prompt_accuracy  # noqa: E402

SOLVERS = {
    "sequential": {"jacobi": False},
    "jacobi 1e-2": {"jacobi": True, "jacobi_threshold": 1e-2},
    "jacobi 1e-3": {"jacobi": True, "jacobi_threshold": 1e-3},
    "jacobi 1e-4": {"jacobi": True, "jacobi_threshold": 1e-4},
}


def deep_passes(pipeline, caption: str, **settings) -> int:
    """Passes of the deep block (the last, text-conditioned one: most of a clip's sampling time)."""
    stats = pipeline.text_to_video(caption, seed=0, **settings).record["sampler"]
    return stats[max(stats, key=int)]["passes"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--skip-samplers", action="store_true", help="only the likelihood and quantization figures")
    args = p.parse_args()
    seeds = range(args.seeds)
    figures = {}
    pipeline = Pipeline.from_pretrained(args.model)
    pipeline.text_to_video(HELD_OUT[0], seed=0)  # warm-up

    for name, settings in ({} if args.skip_samplers else SOLVERS).items():
        start = time.perf_counter()
        acc = prompt_accuracy(pipeline, HELD_OUT, seeds, **settings)
        seconds = (time.perf_counter() - start) / acc.total
        figures[name] = {"seconds_per_clip": seconds, "accuracy": acc.rate,
                         "passes": deep_passes(pipeline, HELD_OUT[0], **settings)}
        print(f"{name:12s} {seconds:6.2f} s/clip  accuracy {acc.correct}/{acc.total}  passes {figures[name]['passes']}")

    figures["bits_per_dim"] = {"train": mean_bits_per_dim(pipeline, TRAIN_CAPTIONS[:12], 1), "held_out": mean_bits_per_dim(pipeline, HELD_OUT, 1)}
    wins, total, _ = likelihood_ranking(pipeline, HELD_OUT, seed=1)
    figures["likelihood_ranking"] = {"wins": wins, "comparisons": total}
    single = best = 0
    for caption in HELD_OUT:
        first, chosen = best_of(pipeline, caption, range(4))
        single += first.matches(caption)
        best += chosen.matches(caption)
    figures["best_of_4"] = {"single": single, "best": best, "captions": len(HELD_OUT)}
    print(f"bits/dim train {figures['bits_per_dim']['train']:.4f} held-out {figures['bits_per_dim']['held_out']:.4f}; "
          f"true caption wins {wins}/{total}; best of 4 {best}/{len(HELD_OUT)} vs single {single}/{len(HELD_OUT)}")

    # Quantized matmuls with float16 scales are very slow on MLX's CPU backend (30 s a clip here): the quantized
    # versions are made from the float32-cast weights, and compared with that float32 model.
    reference = None
    for bits in (None, 8, 4):
        loaded = Pipeline.from_pretrained(args.model, "float32", q_bits=bits)
        start = time.perf_counter()
        acc = prompt_accuracy(loaded, HELD_OUT, seeds)
        seconds = (time.perf_counter() - start) / acc.total
        held = mean_bits_per_dim(loaded, HELD_OUT, 1)
        reference = held if bits is None else reference
        name = "float32" if bits is None else f"q{bits}"
        figures[name] = {"accuracy": acc.rate, "seconds_per_clip": seconds, "held_out_bits_per_dim": held,
                         "delta_bits_per_dim": held - reference}
        print(f"{name:8s} accuracy {acc.correct}/{acc.total}, {seconds:.2f} s/clip, held-out bits/dim {held:.4f} "
              f"(delta {held - reference:+.4f})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
