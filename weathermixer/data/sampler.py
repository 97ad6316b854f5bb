"""Which samples a rank loads at each step: seeded, resumable, identical on every rank of a model
group (DOMAIN x TP ranks see the same indices), disjoint across dp replicas."""

from __future__ import annotations

import numpy as np


class ReplicaSampler:
    """Step s of epoch e: positions [s*B*dp, (s+1)*B*dp) of the epoch's permutation (seed, e);
    dp replica r takes its B-long slice. The incomplete last global batch of an epoch is dropped so
    that every replica takes the same number of steps."""

    def __init__(self, n: int, batch: int, dp: int, dp_rank: int, seed: int = 0, shuffle: bool = True):
        if batch < 1:
            raise ValueError(f"batch={batch} must be >= 1")
        if n < batch * dp:
            raise ValueError(f"{n} samples are fewer than one global batch (batch {batch} x dp {dp})")
        self.n, self.batch, self.dp, self.dp_rank = n, batch, dp, dp_rank
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = n // (batch * dp)
        self.epoch, self.step = 0, 0

    def indices(self, epoch: int, step: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        start = (step * self.dp + self.dp_rank) * self.batch
        return order[start : start + self.batch]

    def position_after(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        return (epoch + 1, 0) if step >= self.steps_per_epoch else (epoch, step)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "n": self.n,
            "batch": self.batch,
            "dp": self.dp,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch", "dp", "shuffle"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this loader has "
                    f"{key}={getattr(self, key)}: positions would not match"
                )
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"sampler state step={state['step']} outside [0, {self.steps_per_epoch})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
