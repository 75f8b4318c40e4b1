"""Which problems a rollout batch takes: rollout batch k takes prompts [k * P, (k + 1) * P) of a
seeded permutation of the problems, a new permutation each epoch (so resuming at any rollout index
reproduces the same prompts)."""
from __future__ import annotations

from typing import Optional

import numpy as np


class PromptSchedule:
    def __init__(self, num_problems: int, prompts_per_batch: int, seed: int) -> None:
        self.n, self.per_batch, self.seed = num_problems, prompts_per_batch, seed
        self._perm: Optional[tuple[int, np.ndarray]] = None  # (epoch, its permutation), cached

    def problem_indices(self, rollout_index: int) -> list[int]:
        out = []
        for pos in range(rollout_index * self.per_batch, (rollout_index + 1) * self.per_batch):
            epoch = pos // self.n
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
            out.append(int(self._perm[1][pos % self.n]))
        return out
