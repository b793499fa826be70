"""Train the shipped model's VAE: diffusers' ``AutoencoderKLWan`` as Wan2.2 (residual blocks, 2x2 patchify, 16x
spatial and 4x temporal compression) at tiny widths, on the synthetic shapes clips (``tests.reference.shapes``).

Reconstruction (L1 + MSE, the moving shape's pixels weighted 5x: on a plain background they are what matters) plus
a small KL term. Clips are 9 frames (1 + 4 + 4: the first frame alone, then two causal chunks, as Wan encodes), so
the temporal caches between chunks are trained; generation decodes longer clips through the same caches.

    python -m tests.reference.train_vae --steps 1500 --out runs/vae

Seeded; saves ``state.pth`` (model, optimizer, step) every ``--save-every`` steps and resumes from it; writes the
trained VAE as a diffusers folder ``OUT/diffusers`` with per-channel latent statistics (``latents_mean`` /
``latents_std`` over the training clips) in its config.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from .shapes import BACKGROUND, TRAIN_CAPTIONS, dataset

Z_DIM = 16


def make_vae(z_dim: int = Z_DIM):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=16, decoder_base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 2, 2], is_residual=True, patch_size=2,
        in_channels=12, out_channels=12, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )


def to_pixels(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float (N, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def vae_loss(vae, x: torch.Tensor, kl_weight: float):
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample()).sample
    background = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1, 1) / 127.5 - 1
    weight = 1 + 4 * ((x - background).abs().amax(1, keepdim=True) > 0.1).float()
    err = rec - x
    recon = (weight * (err.abs() + err.square())).mean()
    kl = posterior.kl().mean() / x[0].numel()
    return recon + kl_weight * kl, recon


@torch.no_grad()
def latent_statistics(vae, clips: np.ndarray, batch: int = 16):
    """Per-channel mean and std of the posterior means over ``clips``."""
    mus = []
    for i in range(0, len(clips), batch):
        mus.append(vae.encode(to_pixels(clips[i : i + batch])).latent_dist.mean)
    mu = torch.cat(mus).transpose(0, 1).reshape(Z_DIM, -1)
    return mu.mean(1).tolist(), mu.std(1).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--clips", type=int, default=4800, help="training clips (generated, seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    clips, _ = dataset(TRAIN_CAPTIONS, args.clips, seed=args.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1)))  # noqa: E731
    state_path, step = out / "state.pth", 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        print(f"resumed at step {step}")
    rng = np.random.default_rng([args.seed, step])
    start = time.time()
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = args.lr * sched(step)
        idx = rng.integers(0, len(clips), args.batch)
        t0 = rng.integers(0, clips.shape[1] - args.frames + 1)
        x = to_pixels(clips[idx, t0 : t0 + args.frames])
        vae.train()
        loss, recon = vae_loss(vae, x, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.4f} recon {recon.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "rng": torch.get_rng_state()}, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
            rng = np.random.default_rng([args.seed, step])  # a resumed run draws the same batches from here

    vae.eval()
    mean, std = latent_statistics(vae, clips[:512])
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(out / "diffusers")
    print(f"wrote {out / 'diffusers'}; training time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
