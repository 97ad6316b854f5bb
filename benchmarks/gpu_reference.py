"""The reference ceiling for bench_gpu.py: a plain PyTorch MLP-Mixer with the WeatherMixer's aligned
shapes, one module per layer (nn.Linear, nn.LayerNorm, F.gelu), bf16 parameters and torch's fused
AdamW (no fp32 master copy: fewer passes than any mixed-precision trainer), forward + backward + step.

Shapes: tokens T, D, H_s, H_c, input patch features (all time levels and static channels in one
input, as one concatenated embedding) and output patch features, each rounded up to `multiple`;
the recovery reads [LN(z) || z0] as the WeatherMixer's does. MFU counts the WeatherMixer's own
(unpadded) FLOPs, as train.py does, so the figures compare one to one.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpu_timing import timed


def up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PlainBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_fc1, self.token_fc2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens, bias=False)
        self.channel_fc1, self.channel_fc2 = nn.Linear(dim, channel_hidden), nn.Linear(channel_hidden, dim)

    def forward(self, x):
        t = self.norm1(x).transpose(1, 2)
        x = x + self.token_fc2(F.gelu(self.token_fc1(t))).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class PlainMixer(nn.Module):
    def __init__(self, shapes: dict, blocks: int):
        super().__init__()
        T, D = shapes["tokens"], shapes["hidden"]
        self.embed = nn.Linear(shapes["in_features"], D)
        self.blocks = nn.ModuleList(
            PlainBlock(T, D, shapes["token_hidden"], shapes["channel_hidden"]) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(D)
        self.recovery = nn.Linear(2 * D, shapes["out_features"])

    def forward(self, x):
        z0 = z = self.embed(x)
        for block in self.blocks:
            z = block(z)
        return self.recovery(torch.cat([self.norm(z), z0], dim=-1))


def aligned_shapes(cfg, multiple: int) -> dict:
    from jigsaw_ext.mesh import Mesh
    from weathermixer.grid import Geometry

    g, ch = Geometry(cfg, Mesh.single()), cfg.channels
    P = g.patch_pixels
    return {
        "tokens": up(g.tokens, multiple),
        "hidden": up(cfg.hidden, multiple),
        "token_hidden": up(g.token_hidden, multiple),
        "channel_hidden": up(g.channel_hidden, multiple),
        "in_features": up(((cfg.history + 1) * ch.n_fields + ch.n_static) * P, multiple),
        "out_features": up(ch.n_fields * P, multiple),
    }


def run_reference(cfg, micro_batch: int, multiple: int, device, budget_s: float, peak_tflops) -> dict:
    """Seconds per forward + backward + fused AdamW step (median), TFLOP/s and MFU of the model's FLOPs."""
    from weathermixer.model.mixer import flops_per_sample

    t_start = time.perf_counter()
    shapes = aligned_shapes(cfg, multiple)
    torch.manual_seed(0)
    model = PlainMixer(shapes, cfg.blocks).to(device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    x = torch.randn(micro_batch, shapes["tokens"], shapes["in_features"], device=device, dtype=torch.bfloat16)
    y = torch.randn(micro_batch, shapes["tokens"], shapes["out_features"], device=device, dtype=torch.bfloat16)

    def step():
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # first step: allocations and the optimizer state
    first = time.perf_counter() - t_start
    reps = max(2, min(10, int((budget_s - first) / max(first, 1e-3) / 2)))
    t = timed(step, device, reps=reps, warmup=1)
    flops = 3 * flops_per_sample(cfg, steps=1) * micro_batch
    tflops = flops / t / 1e12
    out = {
        "shapes": shapes,
        "micro_batch": micro_batch,
        "step_s": t,
        "samples_per_s": micro_batch / t,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "reps": reps,
        "optimizer": "torch AdamW fused=True",
        "dtype": "bfloat16 (parameters and optimizer state)",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        out["peak_mem_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out
