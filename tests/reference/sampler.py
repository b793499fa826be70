"""Sampling in torch (mirror of starflow_mlx/sampler.py): the same solvers, window and denoising, without events.

Options and statistics are the MLX module's own (``starflow_mlx.sampler``), so both implementations read the same
settings and count the same way.
"""

from __future__ import annotations

import torch

from starflow_mlx.sampler import BlockStats, Jacobi, SamplerOptions, SamplerStats

from .flow import DENOISER_STEP, guide


class BlockSolve:
    def __init__(self, block, z, caches, solver: Jacobi, stats: BlockStats, text=None, guidance=0.0, window=None,
                 prefix=None):
        B, T, H, W, C = z.shape
        self.block, self.caches, self.solver, self.stats = block, caches, solver, stats
        self.shape, self.frame_size, self.total = z.shape, H * W, T * H * W
        self.guidance, self.window = guidance, window
        self.text = text if block.txt_dim else None
        self.rope = block.rope(T, H, W, 0 if self.text is None else self.text.shape[1])
        zs = block.permute(z.reshape(B, self.total, C).float(), T)
        self.noise = torch.cat([zs, zs]) if guidance > 0 else zs
        N = self.noise.shape[0]
        self.x = torch.cat([block.sos(N), self.noise], 1)
        self.solved = 0
        if prefix is not None:
            self.solved = prefix.shape[1]
            self.x[:, 1 : 1 + self.solved] = prefix.float().expand(N, self.solved, C)
        elif self.text is not None:
            block.push_text(self.text, caches, self.rope)

    def run(self):
        S, F = self.total, self.frame_size
        span = S if self.window is None else min(S, self.window[0] * F)
        target = span
        while True:
            while self.solved < target:
                self.solve_chunk(target)
            if target >= S:
                return
            overlap = self.window[1]
            target = min(S, target + span - overlap * F)
            self.reencode(self.x[:, self.solved + 1 - overlap * F : self.solved + 1])
            self.stats.reencodes += 1
            self.stats.reencoded_tokens += overlap * F

    def solve_chunk(self, target):
        solver, start, F, x = self.solver, self.solved, self.frame_size, self.x
        size = min(solver.block_size * (1 if start <= F else solver.growth), target - start)
        for i in range(solver.max_iter):
            lo = start - F if (solver.previous_frame_init and i == 0 and start > F) else start
            a, b = self.block.step(x[:, lo : lo + size], self.caches, self.rope)
            if self.guidance > 0:
                a, b = guide(a, b, self.guidance)
            new = b + a * self.noise[:, start : start + size]
            last = i == solver.max_iter - 1
            if not last:
                change = (new - x[:, start + 1 : start + 1 + size]).square().mean() / new.square().mean()
            x[:, start + 1 : start + 1 + size] = new
            self.stats.passes += 1
            self.stats.tokens += size
            if last or change.item() < solver.threshold:
                break
            for cache in self.caches:
                cache.trim(size)
        self.stats.iterations.append(i + 1)
        self.solved = start + size

    def reencode(self, tokens):
        for cache in self.caches:
            cache.reset()
        if self.text is not None:
            self.block.push_text(self.text, self.caches, self.rope)
        self.block.hidden(torch.cat([self.block.sos(tokens.shape[0]), tokens[:, :-1]], 1), None, self.rope, self.caches)

    def result(self):
        B, T, H, W, C = self.shape
        return self.block.permute(self.x[:B, 1:], T).reshape(B, T, H, W, C)


def _invert_shallow(flow, h, video, solver, stats, caches, prefix):
    B, T, H, W, C = h.shape
    local = flow.shallow_local(video, T)
    for i in reversed(range(len(flow.blocks) - 1)):
        block = flow.blocks[i]
        inp = h.reshape(B * T, 1, H, W, C) if local else h
        keep = prefix is not None and not local
        if keep:
            block_caches = prefix.caches[i]
        else:
            block_caches = caches[i]
            for cache in block_caches:
                cache.reset()
        solve = BlockSolve(block, inp, block_caches, solver, stats.block(i), prefix=prefix.tokens[i] if keep else None)
        solve.run()
        h = solve.result().reshape(B, T, H, W, C)
    return h


@torch.no_grad()
def sample(flow, z, text, text_null=None, options: SamplerOptions = SamplerOptions(), prefix=None, stats=None):
    video = z.dim() == 5
    guidance = options.guidance
    text_g = prefix.text if prefix is not None else flow.guided_text(text, text_null, guidance)
    h = flow.patchify(z.float())
    B, T, H, W, C = h.shape
    stats = stats if stats is not None else SamplerStats()
    n = len(flow.blocks)
    window = options.sliding_window(flow) if video else None
    caches = flow.make_cache(T, z.shape[-2], z.shape[-1], text_g.shape[1], None if window is None else window[0])
    solve = BlockSolve(flow.blocks[-1], h, prefix.caches[-1] if prefix is not None else caches[-1], options.solver,
                       stats.block(n - 1), text=text_g, guidance=guidance, window=window,
                       prefix=prefix.tokens[-1] if prefix is not None else None)
    solve.run()
    h = _invert_shallow(flow, solve.result(), video, options.solver, stats, caches, prefix)
    return flow.unpatchify(h, video)


@torch.no_grad()
def denoise(flow, x, text, window=None):
    if not hasattr(flow, "learnable_self_denoiser"):
        return flow.gradient_denoise(x, text)
    if x.dim() == 4:
        return x - DENOISER_STEP * flow.predict_noise(x[:, None], text, False)[:, 0]
    x = x.clone()
    T = x.shape[1]
    steps = window or flow.config.local_attn_window or T
    start, overlap = 0, 0
    while True:
        chunk = x[:, start : start + steps].clone()
        pred = flow.predict_noise(chunk, text, True)
        x[:, start + overlap : start + steps] = (chunk - DENOISER_STEP * pred)[:, overlap:]
        if start + steps >= T:
            break
        overlap = flow.config.denoiser_window if flow.config.denoiser_window is not None else steps - 1
        if overlap >= steps:
            raise ValueError(f"denoiser_window {overlap} must be smaller than the {steps}-frame chunk")
        start += steps - overlap
    return x
