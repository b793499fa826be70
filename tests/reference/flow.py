"""The flow in torch (mirror of starflow_mlx/flow.py and starflow_mlx/denoiser.py), official module names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from starflow_mlx.config import GAUSSIAN_LOG_NORM, FlowConfig
from starflow_mlx.flow import DEPRECATED  # the official buffers no computation reads

from .attention import RMSNorm, TransformerLayer, KVCache
from .rope import rope_table

INV_SOFTPLUS_1 = 0.541324854612918
DENOISER_STEP = 0.3
DENOISER_LAYERS = 8


def guide(a, b, weight):
    n = a.shape[0] // 2
    a_c, a_u, b_c, b_u = a[:n], a[n:], b[:n], b[n:]
    s = (a_c / a_u).clamp(max=1.0).square()
    denom = 1 + weight - weight * s
    a_g = a_c / denom.sqrt()
    b_g = ((1 + weight) * b_c - (weight * s) * b_u) / denom
    return torch.cat([a_g, a_g]), torch.cat([b_g, b_g])


class MetaBlock(torch.nn.Module):
    def __init__(self, config: FlowConfig, dims: int, num_layers: int, txt_dim: int, permutation: str):
        super().__init__()
        cin = config.patch_channels
        self.sos_embed = torch.nn.Parameter(torch.randn(1, 1, cin))
        self.proj_in = torch.nn.Linear(cin, dims)
        self.proj_out = torch.nn.Linear(dims, 2 * cin)
        torch.nn.init.zeros_(self.proj_out.weight)  # an untrained block is the identity
        if txt_dim:
            self.proj_txt = torch.nn.Linear(txt_dim, dims)
        self.attn_blocks = torch.nn.ModuleList(TransformerLayer(dims, config.head_dim) for _ in range(num_layers))
        if config.use_final_norm:
            self.final_norm = RMSNorm(dims)
        self.txt_dim, self.permutation = txt_dim, permutation
        self.flip_in_frame = config.temporal_causal != 0
        self.soft_clip, self.use_softplus = config.soft_clip, config.use_softplus
        self.use_final_norm, self.head_dim, self.pt_seq_len = config.use_final_norm, config.head_dim, config.pt_seq_len

    def permute(self, x, frames):
        if self.permutation == "identity":
            return x
        if self.flip_in_frame and frames > 1:
            B, S, C = x.shape
            return x.view(B, frames, S // frames, C).flip(2).reshape(B, S, C)
        return x.flip(1)

    def rope(self, frames, h, w, txt_len):
        return rope_table(h, w, frames, txt_len if self.txt_dim else 0, self.pt_seq_len, self.head_dim,
                          self.proj_in.weight.device)

    def make_cache(self, max_size=None):
        return [KVCache(max_size) for _ in self.attn_blocks]

    def hidden(self, slots, text, rope, caches=None):
        dtype = self.proj_in.weight.dtype
        parts = []
        if text is not None:
            parts.append(self.proj_txt(text.to(dtype)))
        if slots is not None:
            parts.append(self.proj_in(slots.to(dtype)))
        h = torch.cat(parts, 1)
        txt_len = 0 if text is None else text.shape[1]
        cos, sin = rope
        for layer, cache in zip(self.attn_blocks, caches or [None] * len(self.attn_blocks)):
            h = layer(h, cos, sin, "causal", cache)
        return h[:, txt_len:]

    def affine(self, h):
        if self.use_final_norm:
            h = self.final_norm(h)
        out = self.proj_out(h)
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        s, b = out.float().chunk(2, -1)
        a = F.softplus(s + INV_SOFTPLUS_1) if self.use_softplus else s.exp()
        return a, b

    def step(self, slots, caches, rope):
        return self.affine(self.hidden(slots, None, rope, caches))

    def push_text(self, text, caches, rope):
        self.hidden(None, text, rope, caches)

    def sos(self, batch):
        return self.sos_embed.float().expand(batch, 1, -1)

    def forward(self, x, text=None, guidance=0.0, caches=None):
        B, T, H, W, C = x.shape
        text = text if self.txt_dim else None
        rope = self.rope(T, H, W, 0 if text is None else text.shape[1])
        x_in = self.permute(x.reshape(B, T * H * W, C).float(), T)
        slots = torch.cat([self.sos(B), x_in[:, :-1]], 1)
        a, b = self.affine(self.hidden(slots, text, rope, caches))
        if guidance > 0:
            a, b = guide(a, b, guidance)
        z = self.permute((x_in - b) / a, T).reshape(B, T, H, W, C)
        return z, -a.log(), x_in


def window_mask(txt_len, frames, frame_size, block_causal, window, device=None):
    S = txt_len + frames * frame_size
    q = torch.arange(S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    G = window if window is not None else 10000
    kf, qf = torch.div(k - txt_len, frame_size, rounding_mode="floor"), torch.div(q - txt_len, frame_size, rounding_mode="floor")
    qf_pos = torch.div((q - txt_len).clamp(min=0), frame_size, rounding_mode="floor")
    return (k < txt_len) | ((kf >= qf + block_causal - 1 - G) & (kf <= qf_pos + block_causal - 1))


class Denoiser(torch.nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        dims, cin = config.channels, config.patch_channels
        self.txt_dim = config.txt_dim if config.conditional_denoiser else 0
        self.proj_in = torch.nn.Linear(cin, dims)
        self.proj_out = torch.nn.Linear(dims, cin)
        torch.nn.init.zeros_(self.proj_out.weight)
        if self.txt_dim:
            self.proj_txt = torch.nn.Linear(self.txt_dim, dims)
        self.attn_blocks = torch.nn.ModuleList(TransformerLayer(dims, config.head_dim) for _ in range(DENOISER_LAYERS))
        if config.use_final_norm:
            self.final_norm = RMSNorm(dims)
        self.block_causal, self.window = config.temporal_causal, config.denoiser_window
        self.head_dim, self.pt_seq_len, self.use_final_norm = config.head_dim, config.pt_seq_len, config.use_final_norm

    def forward(self, x, text, video):
        B, T, H, W, C = x.shape
        dtype, device = self.proj_in.weight.dtype, self.proj_in.weight.device
        text = text if self.txt_dim else None
        L = 0 if text is None else text.shape[1]
        cos, sin = rope_table(H, W, T, L, self.pt_seq_len, self.head_dim, device)
        mask = window_mask(L, T, H * W, self.block_causal, self.window, device) if video and self.block_causal > 0 else None
        h = self.proj_in(x.reshape(B, T * H * W, C).to(dtype))
        if text is not None:
            h = torch.cat([self.proj_txt(text.to(dtype)), h], 1)
        for layer in self.attn_blocks:
            h = layer(h, cos, sin, mask)
        h = h[:, L:]
        if self.use_final_norm:
            h = self.final_norm(h)
        return self.proj_out(h).float().reshape(B, T, H, W, C)


@dataclass
class FlowOutput:
    z: torch.Tensor
    logdets: list
    outputs: list
    prefixes: list

    def loss(self):
        loss = 0.5 * self.z.square().flatten(1).mean(1)
        for logdet in self.logdets:
            loss = loss - logdet.flatten(1).mean(1)
        return loss

    def nll(self):
        return self.loss() + GAUSSIAN_LOG_NORM

    def bits_per_dim(self):
        return self.nll() / math.log(2.0)


class StarFlow(torch.nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        n = config.num_blocks
        self.blocks = torch.nn.ModuleList(
            MetaBlock(
                config,
                dims=config.top_channels if i == n - 1 else config.channels,
                num_layers=config.layers_per_block[i],
                txt_dim=config.txt_dim if i == n - 1 else 0,  # cond_top_only: text in the deep block alone
                permutation=config.block_permutation(i),
            )
            for i in range(n)
        )
        if config.learnable_self_denoiser:
            self.learnable_self_denoiser = Denoiser(config)

    def patchify(self, x):
        if x.dim() == 4:
            x = x[:, None]
        B, T, C, H, W = x.shape
        p = self.config.patch_size
        x = x.reshape(B, T, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 4, 6, 2)
        return x.reshape(B, T, H // p, W // p, p * p * C)

    def unpatchify(self, x, video):
        B, T, h, w, _ = x.shape
        p, C = self.config.patch_size, self.config.in_channels
        x = x.reshape(B, T, h, w, p, p, C).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, T, C, h * p, w * p)
        return x if video else x[:, 0]

    def shallow_local(self, video, frames):
        return self.config.shallow_block_local and video and frames > 1

    def make_cache(self, frames, height, width, text_len, window=None):
        p = self.config.patch_size
        F = (height // p) * (width // p)
        local = self.shallow_local(True, frames)
        deep = text_len + F * (frames if window is None else min(frames, window))
        return [block.make_cache(F if local else F * frames) for block in self.blocks[:-1]] + [
            self.blocks[-1].make_cache(deep)
        ]

    def forward(self, x, text, guidance=0.0, caches=None) -> FlowOutput:
        video = x.dim() == 5
        h = self.patchify(x)
        B, T = h.shape[:2]
        outputs, logdets, prefixes = [h], [], []
        for i, block in enumerate(self.blocks[:-1]):
            local = self.shallow_local(video, T)
            inp = h.reshape(B * T, 1, *h.shape[2:]) if local else h
            h, logdet, x_in = block(inp, None, 0.0, caches[i] if caches is not None else None)
            if local:
                h = h.reshape(B, T, *h.shape[2:])
                logdet = logdet.reshape(B, T, -1, logdet.shape[-1])
            outputs.append(h)
            logdets.append(logdet)
            prefixes.append(x_in)
        h, logdet, x_in = self.blocks[-1](h, text, guidance, caches[-1] if caches is not None else None)
        outputs.append(h)
        logdets.append(logdet)
        prefixes.append(x_in)
        return FlowOutput(self.unpatchify(h, video), logdets, outputs, prefixes)

    def guided_text(self, text, text_null, guidance):
        if guidance <= 0:
            return text
        return torch.cat([text, text_null.expand_as(text)])

    @torch.no_grad()
    def prefill(self, x, text, guidance=0.0, text_null=None, frames=None):
        text = self.guided_text(text, text_null, guidance)
        if guidance > 0:
            x = torch.cat([x, x])
        video = x.dim() == 5
        H, W = x.shape[-2:]
        given = x.shape[1] if video else 1
        caches = self.make_cache(max(given, frames or given), H, W, text.shape[1], self.config.local_attn_window)
        out = self(x, text, 0.0, caches)
        tokens = list(out.prefixes)
        if guidance > 0:
            for i in range(len(self.blocks) - 1):
                for cache in caches[i]:
                    cache.keep_batch(cache.keys.shape[0] // 2)
                tokens[i] = tokens[i][: tokens[i].shape[0] // 2]
        return Prefix(caches, tokens, text, guidance)

    def reverse(self, z, text, text_null=None, options=None, prefix=None):
        from .sampler import SamplerOptions, sample

        return sample(self, z, text, text_null, options or SamplerOptions(), prefix)

    def denoise(self, x, text, window=None):
        from .sampler import denoise

        return denoise(self, x, text, window)

    def predict_noise(self, x, text, video):
        return self.unpatchify(self.learnable_self_denoiser(self.patchify(x), text, video), True)

    def gradient_denoise(self, x, text, sigma=None):
        sigma = self.config.noise_std if sigma is None else sigma
        with torch.enable_grad():
            v = x.detach().float().requires_grad_(True)
            loss = self(v, text).loss().sum() * (v.numel() // v.shape[0])
            (grad,) = torch.autograd.grad(loss, [v])
        return (x - sigma**2 * grad).detach()


@dataclass
class Prefix:
    caches: list
    tokens: list
    text: torch.Tensor
    guidance: float


def load_official_state_dict(model: StarFlow, state: dict) -> None:
    """Strict load: strips ``module.``/``_orig_mod.`` prefixes and wrappers, drops only the deprecated buffers."""
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        if not DEPRECATED.match(key):
            clean[key] = value
    model.load_state_dict(clean, strict=True)
