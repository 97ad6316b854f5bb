"""Activation checkpointing across rollout steps (train.checkpoint_rollout): saved-activation bytes and
forward + backward time of a K-step latent rollout of the UK job's model (batch 16), with and without.

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout_checkpoint.py
"""

import time

import torch

from weathermixer.config import ChannelsConfig, ModelConfig
from weathermixer.model.mixer import WeatherMixer

torch.set_num_threads(1)
cfg = ModelConfig(
    grid=(33, 49),
    patch=(3, 7),
    hidden=96,
    blocks=3,
    channel_fraction=2.0,
    history=1,
    channels=ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=["a", "b", "c", "d"]),
)
for K in (6, 24):
    for ck in (False, True):
        model = WeatherMixer(cfg)
        x, s = torch.randn(16, 2, 1, 33, 49), torch.randn(16, 4, 33, 49)
        seen, total = set(), [0]

        def pack(t, seen=seen, total=total):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen and not isinstance(t, torch.nn.Parameter):
                seen.add(key)
                total[0] += key[1]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            leads = model(x, s, steps=K, every_lead=True, checkpoint=ck)
        sum(p.square().mean() for p in leads).backward()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            leads = model(x, s, steps=K, every_lead=True, checkpoint=ck)
            sum(p.square().mean() for p in leads).backward()
            times.append(time.perf_counter() - t0)
        print(
            f"K={K} checkpoint={ck}: saved {total[0] / 2**20:.1f} MiB, forward+backward {min(times):.3f} s (best of 3)"
        )
