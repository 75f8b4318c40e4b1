"""Group-relative advantages for GRPO (docs/ALGORITHMS.md sec. 5).

Rewards arrive flat, `[num_prompts * group_size]`, with the G rollouts of one prompt contiguous
(prompt-major order, the order the rollout stage produces them in). Every function here is a pure
function of that tensor, so it gives the same numbers on every rank and every layout.
"""
from __future__ import annotations

from typing import Literal

import torch

AdvantageMode = Literal["loo", "mean_std", "mean"]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of {group_size}: "
            "pass the G rollouts of every prompt (num_prompts * group_size rewards)"
        )
    return rewards.float().view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, mode: AdvantageMode = "loo", std_eps: float = 1e-4
) -> torch.Tensor:
    """Per-rollout advantages, same shape as `rewards` (fp32).

    - `loo` (default, the paper): A_k = r_k - mean_{j != k} r_j. With G = 1 there is no other
      rollout to compare with, so the advantage is 0.
    - `mean_std` (DeepSeek GRPO): (r_k - mean) / (std + std_eps), std unbiased as in TRL.
    - `mean`: r_k - mean (Dr. GRPO style, no std scaling).
    """
    r = _grouped(rewards, group_size)
    g = r.shape[1]
    if mode == "loo":
        if g == 1:
            return torch.zeros_like(r).view(-1)
        others_mean = (r.sum(dim=1, keepdim=True) - r) / (g - 1)
        adv = r - others_mean
    elif mode == "mean":
        adv = r - r.mean(dim=1, keepdim=True)
    elif mode == "mean_std":
        std = r.std(dim=1, keepdim=True) if g > 1 else torch.zeros_like(r[:, :1])
        adv = (r - r.mean(dim=1, keepdim=True)) / (std + std_eps)
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; choose one of loo, mean_std, mean")
    return adv.reshape(-1)


def zero_std_group_ratio(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> float:
    """Fraction of groups whose G rewards are all equal (max - min <= tol).

    Such groups have zero advantage for every rollout and carry no learning signal (only the KL
    term acts on them); a high ratio means the task is too easy or too hard for the policy.
    """
    r = _grouped(rewards, group_size)
    spread = r.max(dim=1).values - r.min(dim=1).values
    return float((spread <= tol).float().mean().item())


def reward_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Scalars to log for one rollout batch."""
    r = _grouped(rewards, group_size)
    return {
        "reward_mean": float(r.mean().item()),
        "reward_std": float(r.std().item()) if r.numel() > 1 else 0.0,
        "reward_group_std_mean": float(r.std(dim=1).mean().item()) if group_size > 1 else 0.0,
        "zero_std_group_ratio": zero_std_group_ratio(rewards, group_size),
    }
