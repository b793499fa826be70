"""Text to video: a prompt in, an H.264 mp4 out (the record in its metadata and a .json sidecar).

    python examples/text_to_video.py "a red square moving right" --out clip.mp4
"""

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--frames", type=int, help="pixel frames, 1 + 4k for the Wan VAE (default: the pipeline's)")
    p.add_argument("--aspect-ratio", help="e.g. 16:9 (default: the pipeline's)")
    args = p.parse_args()
    pipeline = load(args)
    settings = {k: v for k, v in (("frames", args.frames), ("aspect_ratio", args.aspect_ratio)) if v is not None}
    result = pipeline.text_to_video(args.prompt, seed=args.seed, **settings)
    path = save(result, args.out)
    print(f"{path}: {result.record['frames']} frames of {result.record['size']} in "
          f"{sum(result.record['timings'].values()):.1f} s, {result.record['bits_per_dim'][0]:.4f} bits/dim")


if __name__ == "__main__":
    run(main)
