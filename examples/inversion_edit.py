"""Edit a clip by exact inversion: the flow maps the clip to its noise under the caption it has (--source-prompt)
and samples that noise back under the prompt, so what the two captions share stays. --strength mixes in fresh
noise (0 keeps everything the captions share, 1 is a new sample).

    starflow-mlx generate "a red square moving right" --out red.mp4
    python examples/inversion_edit.py "a blue square moving right" --source-prompt "a red square moving right" \\
        --video red.mp4 --out blue.mp4
"""

from pathlib import Path

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--video", required=True, type=Path, help="the clip to edit")
    p.add_argument("--source-prompt", required=True, help="the caption of --video")
    p.add_argument("--strength", type=float, default=0.0, help="fresh noise mixed in, 0 to 1 (default 0)")
    args = p.parse_args()
    pipeline = load(args)
    result = pipeline.inversion_edit(args.prompt, args.video, source_prompt=args.source_prompt,
                                     strength=args.strength, seed=args.seed)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames, {args.source_prompt!r} -> {args.prompt!r} "
          f"(strength {args.strength:g})")


if __name__ == "__main__":
    run(main)
