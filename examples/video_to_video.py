"""Video to video: continue a clip. Its last ``--given-frames`` frames start the new clip, the rest is sampled
after them under the prompt.

    python examples/video_to_video.py "a red square moving right" --video clip.mp4 --frames 33 --given-frames 9 \\
        --out continued.mp4
"""

from pathlib import Path

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--video", required=True, type=Path, help="the clip to continue")
    p.add_argument("--frames", type=int, help="frames of the new clip, given ones included (default: the pipeline's)")
    p.add_argument("--given-frames", type=int, help="1 + 4k frames of --video kept (default: about half)")
    args = p.parse_args()
    pipeline = load(args)
    settings = {"frames": args.frames} if args.frames is not None else {}
    result = pipeline.video_to_video(args.prompt, args.video, given_frames=args.given_frames, seed=args.seed,
                                     **settings)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames, the first {result.record['given_frames']} from {args.video}")


if __name__ == "__main__":
    run(main)
