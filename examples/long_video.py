"""A long video: more frames than the model was trained on, through the deep block's sliding window
(``--context-length`` latent frames carried from one window to the next).

    python examples/long_video.py "a yellow triangle moving left" --frames 49 --out long.mp4
"""

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--frames", type=int, help="pixel frames, 1 + 4k (default: about twice the training length)")
    p.add_argument("--context-length", type=int, help="latent frames carried over (default: the pipeline's)")
    args = p.parse_args()
    pipeline = load(args)
    frames = args.frames if args.frames is not None else 2 * pipeline.config.frames - 1
    settings = {"context_length": args.context_length} if args.context_length is not None else {}
    result = pipeline.text_to_video(args.prompt, frames=frames, seed=args.seed, **settings)
    path = save(result, args.out)
    deep = result.record["sampler"][max(result.record["sampler"], key=int)]
    print(f"{path}: {result.record['frames']} frames (trained on {pipeline.config.frames}), "
          f"{deep['reencodes']} window moves, {sum(result.record['timings'].values()):.1f} s")


if __name__ == "__main__":
    run(main)
