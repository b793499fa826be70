"""The shapes flow's training data: clips rendered by ``tests.reference.shapes``, encoded by the *converted* MLX VAE
and T5 exactly as the pipeline encodes a given clip and a prompt, so the flow learns the latents it will be asked
to sample and score.

    python -m tests.reference.shapes_data --vae runs/vae-mlx --t5 runs/text-mlx --out runs/shapes-data.npz

Writes ``mean`` / ``scale`` (the flow latent's posterior: ``to_flow_latent`` is mean + scale·ε), ``caption`` (row
index into ``captions``), ``text`` (T5 embeddings of each training caption, the flow's txt_size rows) and
``text_null`` (the empty caption's, for caption dropout). Run with MLX's OpenBLAS preloaded, in its own process.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from starflow_mlx.media import to_pixels
from starflow_mlx.t5 import encode_prompts, load_t5
from starflow_mlx.tokenizer import T5Tokenizer
from starflow_mlx.wan_vae import load_wan_vae

from .shapes import TRAIN_CAPTIONS, dataset


def encode_clips(vae, clips: np.ndarray, batch: int = 32):
    """uint8 (N, T, H, W, 3) -> the flow latent's posterior mean and std, (N, T', C, h, w) float32 each."""
    means, scales = [], []
    for i in range(0, len(clips), batch):
        mean, std = vae.flow_posterior(mx.array(to_pixels(clips[i : i + batch])))  # (B, T', C, h, w) each
        mx.eval(mean, std)
        means.append(np.array(mean))
        scales.append(np.array(std))
    return np.concatenate(means), np.concatenate(scales)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="converted wan-vae folder")
    p.add_argument("--t5", required=True, help="converted t5 folder")
    p.add_argument("--txt-size", type=int, required=True, help="the flow's txt_size")
    p.add_argument("--clips", type=int, default=9600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    start = time.time()
    vae, t5 = load_wan_vae(args.vae), load_t5(args.t5)
    tokenizer = T5Tokenizer.from_folder(args.t5)
    clips, captions = dataset(TRAIN_CAPTIONS, args.clips, seed=args.seed)
    mean, scale = encode_clips(vae, clips)
    index = {c: i for i, c in enumerate(TRAIN_CAPTIONS)}
    text = np.array(encode_prompts(t5, tokenizer, list(TRAIN_CAPTIONS), args.txt_size))
    text_null = np.array(encode_prompts(t5, tokenizer, [""], args.txt_size))[0]
    np.savez(args.out, mean=mean, scale=scale, caption=np.array([index[c] for c in captions]), text=text,
             text_null=text_null, captions=np.array(TRAIN_CAPTIONS))
    print(f"wrote {args.out}: latents {mean.shape}, latent std {mean.std():.3f}, posterior scale "
          f"{np.abs(scale).mean():.4f}; {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
