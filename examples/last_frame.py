"""A clip that leads into a given image (STARFlow-V's trained last-frame task, "(last)"): the image is the frame
right after the clip's last one.

    python examples/last_frame.py "a green circle moving up" --image end.png --out into-end.mp4
"""

from pathlib import Path

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--image", required=True, type=Path, help="the frame the clip leads into (PNG, JPEG or WebP)")
    args = p.parse_args()
    pipeline = load(args)
    result = pipeline.last_frame(args.prompt, args.image, seed=args.seed)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames leading into {args.image}")


if __name__ == "__main__":
    run(main)
