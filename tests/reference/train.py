"""A small training loop for the reference flow (AdamW on the spec §4.4 loss), CPU or CUDA.

Used by the tests (one step must lower the loss) and to train small models on a GPU::

    python -m tests.reference.train --steps 2000 --device cuda --out small.pth
"""

from __future__ import annotations

import argparse

import torch

from starflow_mlx.config import FlowConfig

from .flow import StarFlow


def flow_loss(model: StarFlow, x: torch.Tensor, text: torch.Tensor, noise_std: float, latent_reg: float = 0.0,
              loss_weight: float = 1.0):
    """Noise the data (σ), run the flow, return the mean per-dimension NLL loss (+ optional latent-norm penalty)."""
    noisy = x + noise_std * torch.randn_like(x)
    out = model(noisy, text)
    loss = (out.loss() * loss_weight).mean()
    if latent_reg:
        loss = loss + latent_reg * sum(o.square().mean() for o in out.outputs[:-1])
    return loss


def train_step(model, optimizer, x, text, noise_std, latent_reg=0.0, grad_clip=1.0) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    weight = noise_std / 0.3 if model.config.cond_noise_level else 1.0
    loss = flow_loss(model, x, text, noise_std, latent_reg, weight)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def make_optimizer(model, lr=1e-4, weight_decay=1e-4):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def main():
    p = argparse.ArgumentParser(description="train a small reference flow on synthetic latents")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = FlowConfig(in_channels=4, img_size=8, channels=128, layers_per_block=[2, 2, 4], txt_size=8, txt_dim=32,
                        head_dim=32, soft_clip=4.0)
    model = StarFlow(config).to(args.device)
    opt = make_optimizer(model, args.lr)
    for step in range(args.steps):
        x = torch.randn(args.batch, 4, 8, 8, device=args.device).cumsum(-1) * 0.3  # correlated toy data
        text = torch.randn(args.batch, 8, 32, device=args.device)
        loss = train_step(model, opt, x, text, config.noise_std)
        if step % 50 == 0:
            print(f"step {step} loss {loss:.4f}")
    if args.out:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
