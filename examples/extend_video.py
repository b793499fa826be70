"""Extend a clip mid-scene (STARFlow-V's trained extension task, "(extend)"): its last --given-frames frames come
first, and the flow continues them, past the training length through the sliding window.

    starflow-mlx generate "a red square moving right" --out red.mp4
    python examples/extend_video.py "a red square moving right" --video red.mp4 --given-frames 9 --frames 33 \\
        --out longer.mp4
"""

from pathlib import Path

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--video", required=True, type=Path, help="the clip to extend")
    p.add_argument("--frames", type=int, help="frames of the result, given ones included (default: the pipeline's)")
    p.add_argument("--given-frames", type=int, help="1 + 4k frames of --video kept (default: about half)")
    args = p.parse_args()
    pipeline = load(args)
    settings = {"frames": args.frames} if args.frames is not None else {}
    result = pipeline.extend(args.prompt, args.video, given_frames=args.given_frames, seed=args.seed, **settings)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames, the first {result.record['given_frames']} from {args.video}")


if __name__ == "__main__":
    run(main)
