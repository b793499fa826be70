"""Image to video: a clip whose first frame is the given image (resized and centre-cropped to the bucket).

    python examples/image_to_video.py "a blue circle moving up" --image first.png --out circle.mp4
"""

from pathlib import Path

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--image", required=True, type=Path, help="the first frame (PNG, JPEG or WebP)")
    args = p.parse_args()
    pipeline = load(args)
    result = pipeline.image_to_video(args.prompt, args.image, seed=args.seed)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames from {args.image} in "
          f"{sum(result.record['timings'].values()):.1f} s")


if __name__ == "__main__":
    run(main)
