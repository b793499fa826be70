"""A PNG strip of evenly spaced frames of one generated clip: the picture in the README, made by the real model.

    python examples/frame_strip.py "a red square moving right" --out docs/images/red-square-moving-right.png --overwrite

Frames are enlarged (nearest neighbour, ``--scale``) so that a 64-pixel clip is visible, with a thin gap between.
"""

import numpy as np
from common import load, parser, run
from PIL import Image

from starflow_mlx import media


def strip(frames: np.ndarray, count: int, scale: int, gap: int = 2) -> np.ndarray:
    """uint8 (T, H, W, 3) -> one image of ``count`` evenly spaced frames side by side, each enlarged ``scale``x."""
    picked = frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)]
    picked = picked.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = picked.shape[1:3]
    out = np.full((height, len(picked) * (width + gap) - gap, 3), 255, np.uint8)
    for i, frame in enumerate(picked):
        out[:, i * (width + gap) : i * (width + gap) + width] = frame
    return out


def main():
    p = parser(__doc__)
    p.add_argument("--count", type=int, default=9, help="frames in the strip")
    p.add_argument("--scale", type=int, default=2, help="enlargement of each frame")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args()
    if args.count < 1 or args.scale < 1:
        raise ValueError(f"--count and --scale must be >= 1, got {args.count} and {args.scale}")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out}: exists; pass --overwrite to replace it")
    pipeline = load(args)
    result = pipeline.text_to_video(args.prompt, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip(media.to_uint8(result.frames[0]), args.count, args.scale)).save(args.out)
    shown = min(args.count, result.frames.shape[1])
    print(f"{args.out}: {shown} of {result.frames.shape[1]} frames of {args.prompt!r} (seed {args.seed})")


if __name__ == "__main__":
    run(main)
