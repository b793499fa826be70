"""The shapes flow's data for the tasks beyond text to video, the way the official trainer builds them (spec §6,
``train.py``): ``(v2v) `` edit pairs (the source clip's latent frames, then the target's), ``(last) `` clips (the
latent of the frame after the clip, encoded alone as an image, then the clip's) and the captions of ``(extend) ``
(the text-to-video latents without their first, image, latent frame: built by the trainer from the base data).

    python -m tests.reference.shapes_tasks --base runs/shapes-data.npz --vae runs/vae-mlx --t5 runs/text-mlx \\
        --txt-size 24 --out runs/shapes-tasks.npz

An edit pair's source is a clip of the base data (re-drawn from the same seed, its latent read from ``--base``);
its target keeps the source's motion, size and colour jitter and changes one attribute (colour, shape or
direction) to another training combination. Writes ``edit_source`` (base rows), ``edit_mean`` / ``edit_scale``
(the target's posterior), ``edit_caption`` (target caption index), ``edit_attribute``; ``last_mean`` /
``last_scale`` (N, 1 + T', C, h, w) and ``last_caption``; ``text_v2v``, ``text_last``, ``text_extend`` (T5
embeddings of each training caption with the prefix). Run with MLX's OpenBLAS preloaded, in its own process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from starflow_mlx.prompts import TASK_PREFIXES
from starflow_mlx.t5 import encode_prompts, load_t5
from starflow_mlx.tokenizer import T5Tokenizer
from starflow_mlx.wan_vae import load_wan_vae

from .shapes import ATTRIBUTES, COLOURS, DIRECTIONS, FRAMES, SHAPES, TRAIN_CAPTIONS, Caption, captions_motions, \
    draw, edit, edit_pair, sample_motion
from .shapes_data import encode_clips

VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS)}
LAST_GAP = 4  # official: the clip is x[:, :-4] and the condition the frame x[:, -4], the one right after it


def edit_targets(captions: list[str], count: int, rng: np.random.Generator):
    """``count`` (base row, attribute, target caption) with the target a training caption one attribute away."""
    train = set(TRAIN_CAPTIONS)
    out = []
    while len(out) < count:
        row = int(rng.integers(len(captions)))
        attribute = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        source = Caption.parse(captions[row])
        others = [v for v in VALUES[attribute] if v != getattr(source, attribute)]
        target = str(edit(source, attribute, others[int(rng.integers(len(others)))]))
        if target in train:
            out.append((row, attribute, target))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the text-to-video data (tests.reference.shapes_data)")
    p.add_argument("--vae", required=True)
    p.add_argument("--t5", required=True)
    p.add_argument("--txt-size", type=int, required=True)
    p.add_argument("--clips", type=int, default=6400, help="the base data's --clips")
    p.add_argument("--seed", type=int, default=1, help="the base data's --seed")
    p.add_argument("--edits", type=int, default=2000)
    p.add_argument("--last", type=int, default=1000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    start = time.time()
    vae, t5 = load_wan_vae(args.vae), load_t5(args.t5)
    tokenizer = T5Tokenizer.from_folder(args.t5)
    with np.load(args.base) as f:
        base_mean = f["mean"]
    captions, motions = captions_motions(TRAIN_CAPTIONS, args.clips, args.seed)
    if len(captions) != len(base_mean):
        raise SystemExit(f"--clips {args.clips} does not match {args.base} ({len(base_mean)} clips)")
    check, _ = encode_clips(vae, draw(captions[0], motions[0])[None])
    if not np.allclose(check[0], base_mean[0], atol=1e-3):
        raise SystemExit(f"{args.base} was not made with --seed {args.seed}: its first clip differs")
    index = {c: i for i, c in enumerate(TRAIN_CAPTIONS)}

    rng = np.random.default_rng([args.seed, 12])
    edits = edit_targets(captions, args.edits, rng)
    targets = np.stack([edit_pair(captions[r], t, motions[r])[1] for r, _, t in edits])
    edit_mean, edit_scale = encode_clips(vae, targets)
    print(f"edits: {len(edits)} targets encoded, {time.time() - start:.0f}s", flush=True)

    frames = FRAMES + LAST_GAP
    last_captions = [TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)] for i in rng.permutation(args.last)]
    clips = np.stack([draw(c, sample_motion(c, rng, frames), frames) for c in last_captions])
    clip_mean, clip_scale = encode_clips(vae, clips[:, :FRAMES])
    image_mean, image_scale = encode_clips(vae, clips[:, FRAMES : FRAMES + 1])
    print(f"last frame: {len(clips)} clips encoded, {time.time() - start:.0f}s", flush=True)

    texts = {f"text_{task}": np.array(encode_prompts(t5, tokenizer, [prefix + c for c in TRAIN_CAPTIONS],
                                                     args.txt_size))
             for task, prefix in TASK_PREFIXES.items()}
    np.savez(
        args.out,
        edit_source=np.array([r for r, _, _ in edits]), edit_mean=edit_mean, edit_scale=edit_scale,
        edit_caption=np.array([index[t] for _, _, t in edits]),
        edit_attribute=np.array([ATTRIBUTES.index(a) for _, a, _ in edits]),
        last_mean=np.concatenate([image_mean, clip_mean], 1), last_scale=np.concatenate([image_scale, clip_scale], 1),
        last_caption=np.array([index[c] for c in last_captions]), captions=np.array(TRAIN_CAPTIONS), **texts,
    )
    print(f"wrote {args.out}; {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
