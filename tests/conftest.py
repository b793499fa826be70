"""Shared fixtures: tiny official-format checkpoints made on the fly (the official fixtures: tests/helpers.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# A tiny configuration shaped like the released T2V one (spec §3, "tiny video config used for verification").
TINY_VIDEO_YAML = """arguments:
- img_size: 4
- channel_size: 6
- patch_size: 1
- channels: 64
- top_block_channels: 96
- blocks: 6
- layers_per_block: 1 1 1 1 1 2
- head_dim: 32
- rope: 1
- pt_seq_len: 4
- sos: 1
- txt_size: 5
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
- noise_std: 0.5
- cond_noise_level: 1
- vid_size: '9:16'
- vae: none
- text: tiny-16
- nvp: 1
- adaln: 0
"""


def diffusers_wan_decode_unclamped(vae, z):
    """diffusers' ``AutoencoderKLWan._decode`` loop without its final clamp to [-1, 1] (Wan's own decode does not
    clamp), for latents (B, C, T, h, w). Shared by the Wan VAE tests and its benchmark."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    with torch.no_grad():
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(z.shape[2]):
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=i == 0))
        vae.clear_cache()
        return unpatchify(torch.cat(outs, 2), 2)


def randomize_(model, seed: int = 0) -> None:
    """Random non-trivial weights: the official init zeroes proj_out and the final norm, which would make every
    block the identity and every parity test pass trivially."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
                if "proj_out" in name:
                    p.mul_(0.5)
            elif name.endswith("norm.weight") and "final_norm" not in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def official_state_dict(model, config) -> dict:
    """The reference's state_dict plus the deprecated buffers an official checkpoint carries."""
    import torch

    sd = dict(model.state_dict())
    P2, L = config.pt_seq_len**2, config.txt_size
    sd["var"] = torch.ones(P2, config.patch_channels)
    for i in range(config.num_blocks):
        sd[f"blocks.{i}.attn_mask"] = torch.tril(torch.ones(P2 + L, P2 + L))
    sd["feat_rope.freqs_cos"] = torch.zeros(L + P2, config.head_dim)
    sd["feat_rope.freqs_sin"] = sd["feat_rope.freqs_cos"]
    return sd


@dataclass(frozen=True)
class TinyVideo:
    """The tiny T2V-shaped model: our torch reference with random weights, its official-format files, and the
    float32 MLX folder converted from them."""

    reference: object
    config: object
    checkpoint: Path
    yaml: Path
    folder: Path


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory) -> TinyVideo:
    torch = pytest.importorskip("torch")
    from starflow_mlx.convert.flow import convert_flow
    from starflow_mlx.config import load_official_yaml
    from tests.reference import StarFlow

    root = tmp_path_factory.mktemp("tiny_video")
    yaml_path = root / "config.yaml"
    yaml_path.write_text(TINY_VIDEO_YAML)
    config = load_official_yaml(yaml_path)
    torch.manual_seed(0)
    model = StarFlow(config).eval()
    randomize_(model, seed=1)
    ckpt = root / "model.pth"
    torch.save(official_state_dict(model, config), ckpt)
    folder = convert_flow(ckpt, yaml_path, root / "mlx")
    return TinyVideo(model, config, ckpt, yaml_path, folder)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny T2V (Wan VAE) and T2I (SD VAE) pipeline folders, built once through ``convert pipeline`` from the
    sources of ``tests.test_pipeline_folder.make_tiny_sources``."""
    from starflow_mlx.cli import main as cli_main
    from tests.test_pipeline_folder import make_tiny_sources

    sources = make_tiny_sources(tmp_path_factory.mktemp("pipeline_sources"))
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for task in ("t2v", "t2i"):
        out[task] = root / task
        assert cli_main(["convert", "pipeline", *sources.local_argv(task), str(out[task])]) == 0
    return out
