"""The learnable self-denoiser of STARFlow-V (flow-score matching, spec §1 and §5.7).

A non-causal transformer (8 layers at the shallow width) over ``[proj_txt(text) ; proj_in(x)]`` that predicts
sigma * grad NLL of the flow; sampling subtracts 0.3 * prediction. For video it sees a window of frames
(block-causal mask, §4.5); for images it is fully bidirectional.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import RMSNorm, TransformerLayer
from .config import DENOISER_LAYERS, FlowConfig
from .rope import rope_table


def window_mask(txt_len: int, frames: int, frame_size: int, block_causal: int, window: int | None) -> np.ndarray:
    """Boolean (S, S) mask over [text ; video]: all text, and frames qf - (window + 1 - A) ... qf + A - 1.

    Floor division on negative offsets is intended: text queries get qf < 0 (official ``get_local_window_mask``).
    """
    S = txt_len + frames * frame_size
    idx = np.arange(S)
    q, k = idx[:, None], idx[None, :]
    G = window if window is not None else 10000
    kf, qf = (k - txt_len) // frame_size, (q - txt_len) // frame_size
    qf_pos = np.maximum(q - txt_len, 0) // frame_size
    return (k < txt_len) | ((kf >= qf + block_causal - 1 - G) & (kf <= qf_pos + block_causal - 1))


class Denoiser(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        dims, cin = config.channels, config.patch_channels
        self.txt_dim = config.txt_dim if config.conditional_denoiser else 0
        self.proj_in = nn.Linear(cin, dims)
        if self.txt_dim:
            self.proj_txt = nn.Linear(self.txt_dim, dims)
        self.layers = [TransformerLayer(dims, config.head_dim) for _ in range(DENOISER_LAYERS)]
        if config.use_final_norm:
            self.final_norm = RMSNorm(dims)
        self.proj_out = nn.Linear(dims, cin)
        self.block_causal = config.temporal_causal
        self.window = config.denoiser_window
        self.head_dim = config.head_dim
        self.pt_seq_len = config.pt_seq_len
        self.use_final_norm = config.use_final_norm

    def __call__(self, x: mx.array, text: mx.array | None, video: bool) -> mx.array:
        """x (B, T, H, W, C) patchified latent -> prediction of the same shape."""
        B, T, H, W, C = x.shape
        dtype = self.proj_in.weight.dtype
        text = text if self.txt_dim else None
        L = 0 if text is None else text.shape[1]
        cos, sin = rope_table(H, W, T, L, self.pt_seq_len, self.head_dim)
        mask = None
        if video and self.block_causal > 0:
            mask = mx.array(window_mask(L, T, H * W, self.block_causal, self.window))
        h = self.proj_in(x.reshape(B, T * H * W, C).astype(dtype))
        if text is not None:
            h = mx.concatenate([self.proj_txt(text.astype(dtype)), h], axis=1)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        h = h[:, L:]
        if self.use_final_norm:
            h = self.final_norm(h)
        return self.proj_out(h).astype(mx.float32).reshape(B, T, H, W, C)
