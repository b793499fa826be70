"""Training the reference flow (AdamW on the spec §4.4 loss), CPU or CUDA, one process or several under torchrun.

The pieces the tests use: ``flow_loss`` / ``train_step`` (the flow alone), and ``training_step``: the STARFlow-V
recipe step -- Gaussian noise σ on the inputs, caption dropout done by the caller, the flow's NLL, and the
learnable denoiser regressed on the flow's own score (flow-score matching, spec §2), gradients averaged across
processes. ``main`` trains the model shipped in the package (or the one ``--config YAML`` describes) on the shapes
latents (``tests.reference.shapes_data``)::

    python -m tests.reference.train --data runs/shapes-data.npz --out runs/flow          # one process
    torchrun --nproc-per-node 2 -m tests.reference.train --data ... --out ...            # data parallel (gloo/NCCL)

Seeded; every step's global batch (clips, noise, dropped captions) is drawn from (seed, step), and process r takes
rows r·b..(r+1)·b of it, so N processes with batch b each follow one process with batch N·b. Checkpoints
(``state.pth``: model, EMA, optimizer, step) are written every ``--save-every`` steps and a run resumes from them.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from starflow_mlx.config import GAUSSIAN_LOG_NORM, FlowConfig, load_official_yaml

from .flow import DENOISER_STEP, StarFlow

DENOISER_PREFIX = "learnable_self_denoiser."


def flow_loss(model: StarFlow, x: torch.Tensor, text: torch.Tensor, noise_std: float, latent_reg: float = 0.0,
              loss_weight: float = 1.0):
    """Noise the data (σ), run the flow, return the mean per-dimension NLL loss (+ optional latent-norm penalty)."""
    noisy = x + noise_std * torch.randn_like(x)
    out = model(noisy, text)
    loss = (out.loss() * loss_weight).mean()
    if latent_reg:
        loss = loss + latent_reg * sum(o.square().mean() for o in out.outputs[:-1])
    return loss


def loss_weight(config: FlowConfig, noise_std: float) -> float:
    # the official trainer scales the loss by σ/0.3 when the noise level is a condition (cond_noise_level)
    return noise_std / 0.3 if config.cond_noise_level else 1.0


def train_step(model, optimizer, x, text, noise_std, latent_reg=0.0, grad_clip=1.0) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = flow_loss(model, x, text, noise_std, latent_reg, loss_weight(model.config, noise_std))
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def make_optimizer(model, lr=1e-4, weight_decay=1e-4):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def losses_and_gradients(model: StarFlow, noisy: torch.Tensor, text: torch.Tensor, noise_std: float):
    """The flow's loss on ``noisy`` (inputs with σ noise already added) and, for a model with a learnable denoiser,
    the denoiser's flow-score-matching loss; the gradients of both are accumulated into ``.grad``.

    The denoiser's target is ``σ²/0.3 · ∇_x NLL(x)`` with NLL the sample's total negative log-likelihood under the
    flow, so that sampling's ``x - 0.3 · pred`` is Tweedie's step ``x - σ² ∇NLL``. The official trainer writes it
    as ``w·σ·∇`` with ``w = σ/0.3`` the loss weight of cond_noise_level models; the same number. One backward pass
    of the flow gives both its parameter gradients and the input gradient the target needs.
    """
    weight = loss_weight(model.config, noise_std)
    flow_params = split_parameters(model)[0]
    noisy = noisy.detach().requires_grad_(model.config.learnable_self_denoiser)
    loss = weight * model(noisy, text).loss().mean()
    if not model.config.learnable_self_denoiser:
        loss.backward()
        return loss.detach(), None
    grads = torch.autograd.grad(loss, [noisy, *flow_params], allow_unused=True)
    for p, g in zip(flow_params, grads[1:]):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    # loss = weight/B · Σ_b NLL_b/D: the input gradient times B·D/weight is ∇ of each sample's total NLL
    batch, dims = noisy.shape[0], noisy[0].numel()
    target = (noise_std**2 / DENOISER_STEP) * grads[0] * (batch * dims / weight)
    denoiser_loss = (model.predict_noise(noisy.detach(), text, noisy.dim() == 5) - target).square().mean()
    denoiser_loss.backward()
    return loss.detach(), denoiser_loss.detach()


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """What DistributedDataParallel does after backward, done by hand: the step runs two backward passes (the
    flow's, which also gives the denoiser its target, then the denoiser's), which DDP's one-backward-per-forward
    hooks do not allow."""
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def training_step(model, optimizer, x, text, noise, noise_std, world: int = 1, grad_clip: float = 1.0):
    """One optimizer step on this process's rows: ``x`` clean latents, ``noise`` ε (x's shape), ``text`` the
    (possibly dropped) caption embeddings. Returns (flow loss, denoiser loss or None) of these rows."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, denoiser_loss = losses_and_gradients(model, x + noise_std * noise, text, noise_std)
    average_gradients(model, world)
    if grad_clip:  # the flow and the denoiser apart, as the official trainer: one's large gradient never shrinks
        flow, denoiser = split_parameters(model)  # the other's step
        for group in (flow, denoiser):
            if group:
                torch.nn.utils.clip_grad_norm_(group, grad_clip)
    optimizer.step()
    return loss, denoiser_loss


def split_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """(the flow's parameters, the learnable denoiser's)."""
    named = list(model.named_parameters())
    return ([p for n, p in named if not n.startswith(DENOISER_PREFIX)],
            [p for n, p in named if n.startswith(DENOISER_PREFIX)])


# ----------------------------------------------------------------------------------------------------------------
# The shipped model
# ----------------------------------------------------------------------------------------------------------------

SHAPES_YAML = """arguments:
- img_size: 64
- vid_size: '17:8'
- channel_size: 16
- patch_size: 1
- channels: 64
- top_block_channels: 128
- blocks: 4
- layers_per_block: 1 1 1 4
- head_dim: 32
- rope: 1
- pt_seq_len: 4
- sos: 1
- txt_size: 24
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- soft_clip: 4
- temporal_causal: 2
- shallow_block_local: 1
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 10
- noise_std: 0.3
- cond_noise_level: 0
- fps_cond: 0
- mix_aspect: 0
- cfg: 3.0
- vae: starflow-mlx/shapes-Wan2.2-VAE:0.6
- text: tiny-64
- nvp: 1
- adaln: 0
"""


def setup_distributed(device: str) -> tuple[int, int]:
    """(rank, world) from torchrun's environment; gloo on CPU, NCCL on CUDA. (0, 1) without torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # this node's GPU, before NCCL starts
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


TASKS = ("t2v", "v2v", "last", "extend")


def parse_task_mix(text: str) -> dict[str, float]:
    """"t2v=0.4,v2v=0.3,..." -> {task: probability}, normalised; tasks of ``TASKS``."""
    mix = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name not in TASKS or not weight:
            raise SystemExit(f"--task-mix: {item!r} is not TASK=WEIGHT with TASK one of {', '.join(TASKS)}")
        mix[name] = float(weight)
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def step_task(mix: dict[str, float], seed: int, step: int) -> str:
    """The task of step ``step``: drawn from (seed, step) by the mix (one task per step: one sequence length)."""
    if set(mix) == {"t2v"}:
        return "t2v"
    rng = np.random.default_rng([seed, step, 1])
    return list(mix)[int(rng.choice(len(mix), p=list(mix.values())))]


def task_rows(data: dict, task: str, rows_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(posterior mean, posterior std, caption index) of the rows ``rows_of(count)`` of ``task``'s clips: the
    official sequences -- ``v2v`` the source's latent frames then the target's, ``last`` the image latent of the
    frame after the clip then the clip's, ``extend`` a text-to-video clip without its first latent frame."""
    if task == "v2v":
        rows = rows_of(len(data["edit_mean"]))
        source = data["edit_source"][rows]
        return (np.concatenate([data["mean"][source], data["edit_mean"][rows]], 1),
                np.concatenate([data["scale"][source], data["edit_scale"][rows]], 1), data["edit_caption"][rows])
    if task == "last":
        rows = rows_of(len(data["last_mean"]))
        return data["last_mean"][rows], data["last_scale"][rows], data["last_caption"][rows]
    rows = rows_of(len(data["mean"]))
    mean, scale = data["mean"][rows], data["scale"][rows]
    if task == "extend":
        mean, scale = mean[:, 1:], scale[:, 1:]
    return mean, scale, data["caption"][rows]


def global_batch(data: dict, step: int, seed: int, batch: int, drop: float, task: str = "t2v"):
    """The step's global batch, drawn from (seed, step): latents sampled from the stored posteriors, noise ε,
    caption embeddings (with ``task``'s caption prefix) with a fraction ``drop`` replaced by the empty caption's."""
    rng = np.random.default_rng([seed, step])
    mean, scale, captions = task_rows(data, task, lambda count: rng.integers(0, count, batch))
    posterior = rng.standard_normal(mean.shape, dtype=np.float32)
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    dropped = rng.random(batch) < drop
    x = mean + scale * posterior
    text = data["text" if task == "t2v" else f"text_{task}"][captions]
    text[dropped] = data["text_null"]
    return torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(noise)


def ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.state_dict().items():
            ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))


def main(argv=None):
    p = argparse.ArgumentParser(description="train the shipped shapes flow (see the module docstring)")
    p.add_argument("--data", required=True, help="the .npz written by tests.reference.shapes_data")
    p.add_argument("--out", required=True)
    p.add_argument("--config", type=Path, help="the model's YAML in the official format (default: SHAPES_YAML)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32, help="global batch (split across processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--tasks", help="the .npz of tests.reference.shapes_tasks (edit pairs, last-frame clips)")
    p.add_argument("--task-mix", default="t2v=1", help="TASK=WEIGHT,... of t2v, v2v, last, extend")
    p.add_argument("--init", type=Path, help="start from these weights (a model.pth); ignored when resuming")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    rank, world = setup_distributed(args.device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {world} processes")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    yaml_text = SHAPES_YAML if args.config is None else args.config.read_text()
    yaml_path = out / "model.yaml"
    if rank == 0:
        yaml_path.write_text(yaml_text)
    config = load_official_yaml_text(yaml_text, out)
    with np.load(args.data) as f:
        data = {k: f[k] for k in f.files}
    mix = parse_task_mix(args.task_mix)
    if args.tasks:
        with np.load(args.tasks) as f:
            if list(f["captions"]) != list(data["captions"]):
                raise SystemExit(f"{args.tasks} and {args.data} index different captions")
            data.update({k: f[k] for k in f.files})
    if set(mix) - {"t2v"} and not args.tasks:
        raise SystemExit(f"--task-mix {args.task_mix} needs --tasks")

    torch.manual_seed(args.seed)
    model = StarFlow(config).to(device)
    optimizer = make_optimizer(model, args.lr, weight_decay=1e-4)
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location=device, weights_only=True))
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    step, state_path = 0, out / "state.pth"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
        step = state["step"]
        if rank == 0:
            print(f"resumed at step {step}", flush=True)
    local = args.batch // world
    if rank == 0:
        print(f"{world} process(es) on {device}, {local} clips each", flush=True)
    start = time.time()
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        task = step_task(mix, args.seed, step)
        x, text, noise = (t[rank * local : (rank + 1) * local].to(device)
                          for t in global_batch(data, step, args.seed, args.batch, args.caption_dropout, task))
        loss, denoiser_loss = training_step(model, optimizer, x, text, noise, config.noise_std, world)
        ema_update(ema, model, args.ema)
        step += 1
        if step % 25 == 0 or step == 1:
            losses = torch.stack([loss, torch.zeros_like(loss) if denoiser_loss is None else denoiser_loss]).float()
            if world > 1:
                dist.all_reduce(losses)
                losses /= world
            if rank == 0:
                nll = losses[0].item() / loss_weight(config, config.noise_std)  # the loss carries the weight
                bpd = (nll + GAUSSIAN_LOG_NORM) / math.log(2)
                print(f"step {step} {task} loss {losses[0].item():.4f} ({bpd:.3f} bits/dim) denoiser "
                      f"{losses[1].item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} {time.time() - start:.0f}s",
                      flush=True)
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema,
                        "step": step}, tmp)
            tmp.replace(state_path)
    if rank == 0:
        final = out / "model.pth"
        torch.save({k: v.cpu() for k, v in ema.items()}, final)
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        print(f"wrote {final} (EMA weights, sha256 {digest}) and {yaml_path}; {time.time() - start:.0f}s")
    if world > 1:
        dist.destroy_process_group()


def load_official_yaml_text(text: str, folder: Path) -> FlowConfig:
    path = folder / f".model-{os.getpid()}.yaml"
    path.write_text(text)
    try:
        return load_official_yaml(path)
    finally:
        path.unlink()


if __name__ == "__main__":
    main()
