"""Best of N by likelihood: sample N seeds, score each sample under the prompt (bits/dim of its noisy latent, the
density the flow was trained on), keep the lowest, and print all N.

    python examples/score_and_best_of.py "a green square moving down" --n 4 --out best.mp4
"""

from common import load, parser, run, save


def main():
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=4, help="how many seeds to sample (--seed, --seed + 1, ...)")
    args = p.parse_args()
    pipeline = load(args)
    generate = pipeline.text_to_video if pipeline.video else pipeline.text_to_image
    scored = []
    for seed in range(args.seed, args.seed + args.n):
        result = generate(args.prompt, seed=seed)
        frames = result.frames[0] if pipeline.video else result.frames[0, 0]
        # the same scoring seed for every sample: they are ranked under the same encoder and σ noise draws
        bits = pipeline.log_likelihood(frames, args.prompt, seed=0).bits_per_dim[0]
        scored.append((bits, seed, result))
    bits, seed, best = min(scored, key=lambda entry: entry[0])
    path = save(best, args.out)
    ranking = ", ".join(f"seed {s}: {b:.4f}" for b, s, _ in sorted(scored, key=lambda entry: entry[0]))
    print(f"{path}: kept seed {seed}; bits/dim {ranking}")


if __name__ == "__main__":
    run(main)
