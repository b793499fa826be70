"""The long fuzzing campaign of the weights-only checkpoint reader (the CI test runs a few hundred cases).

Runs the cases of ``tests/test_fuzz_checkpoint.py`` (mutated ``torch.save`` files; each either refused with a
one-line CheckpointError or loaded to exactly what torch.load(weights_only=True) or, where torch refuses the
container, an independent decoding returns; no audit event of code running) in batches, each batch a bounded
subprocess with its own hypothesis seed, so a crash is reported with its input and the campaign goes on:

    python benchmarks/fuzz_checkpoint.py --cases 50000            # prints the figures as JSON
    python benchmarks/fuzz_checkpoint.py --cases 2000 --batch 500 --seed 7
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_fuzz_checkpoint import run_in_subprocess  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=5_000, help="cases per subprocess")
    parser.add_argument("--seed", type=int, default=0, help="the first batch's hypothesis seed")
    parser.add_argument("--keep-dir", default=tempfile.gettempdir(), help="where a failing case's input is kept")
    args = parser.parse_args()

    outcomes, kinds, failures = Counter(), Counter(), []
    start = time.perf_counter()
    for batch, first in enumerate(range(0, args.cases, args.batch)):
        with tempfile.TemporaryDirectory() as workdir:
            try:
                result = run_in_subprocess(min(args.batch, args.cases - first), args.seed + batch, Path(workdir))
            except AssertionError as e:  # a crash or a broken rule: keep the input and go on
                kept = Path(args.keep_dir) / f"fuzz_failure_{args.seed + batch}.pth"
                case = Path(workdir) / "last_case.pth"
                if case.exists():
                    kept.write_bytes(case.read_bytes())
                failures.append({"seed": args.seed + batch, "input": str(kept), "error": str(e)[-2000:]})
                continue
        outcomes.update(result["outcomes"])
        kinds.update(result["by_kind"])
        print(f"batch {batch}: {sum(outcomes.values())} cases, {len(failures)} failures, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(json.dumps({
        "cases": sum(outcomes.values()),
        "failures": failures,
        "wall_s": round(time.perf_counter() - start, 1),
        "by_mutation": dict(sorted(kinds.items())),
        "outcomes": dict(outcomes.most_common()),
    }, indent=1))


if __name__ == "__main__":
    main()
