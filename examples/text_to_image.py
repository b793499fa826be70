"""Text to image: a PNG from STARFlow (a T2I pipeline) or one frame of STARFlow-V.

    python examples/text_to_image.py "a white circle moving down" --out frame.png          # the shipped model's frame 0
    python examples/text_to_image.py "a lighthouse at dusk, oil painting" --model T2I_PIPELINE --out lighthouse.png
"""

from common import load, parser, run, save


def main():
    args = parser(__doc__).parse_args()
    pipeline = load(args)
    result = pipeline.text_to_image(args.prompt, seed=args.seed)
    path = save(result, args.out)
    print(f"{path}: {result.record['size']} in {sum(result.record['timings'].values()):.1f} s, "
          f"{result.record['bits_per_dim'][0]:.4f} bits/dim")


if __name__ == "__main__":
    run(main)
