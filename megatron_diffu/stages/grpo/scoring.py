"""Rewards and advantages of a rollout batch.

Rewards: each completion's text (cut before the first stop token) goes to
`rl.rewards.compute_rewards` with `grpo.reward_funcs` / `grpo.reward_weights` (sandboxed); the rows
are split over ALL ranks of the world (TP/PP included) and summed back with one all-reduce.
Advantages: `rl.advantages.group_advantages` over the G completions of each prompt.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_diffu.rl.advantages import group_advantages, reward_stats
from megatron_diffu.rl.rewards import compute_rewards


def completion_text(tokenizer, ids: list[int], stop_ids: list[int]) -> str:
    """The completion's text: tokens before the first <|im_end|> / <|endoftext|> / pad."""
    stops = set(stop_ids) | {int(tokenizer.pad_id)}
    cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut])


def score_rollouts(trainer, texts_of, problems: list, prompt_length: int) -> tuple[torch.Tensor, dict]:
    """Weighted rewards [R] fp32 and per-function statistics. `texts_of(rows) -> texts` decodes
    the given global rows; `problems[r]` is row r's problem."""
    g, grid = trainer.cfg.grpo, trainer.grid
    R, names = len(problems), list(g.reward_funcs)
    table = torch.zeros(R, 1 + len(names), dtype=torch.float64)
    rows = list(range(grid.rank, R, grid.world_size))
    if rows:
        out = compute_rewards(texts_of(rows), [problems[r] for r in rows], dict(zip(names, g.reward_weights)))
        for j, r in enumerate(rows):
            table[r, 0] = out.total[j]
            for c, n in enumerate(names):
                table[r, 1 + c] = out.components[n][j]
    if grid.world_size > 1:
        table = table.to(trainer.device)
        dist.all_reduce(table)
        table = table.cpu()
    stats = {f"reward_{n}": float(table[:, 1 + c].mean()) for c, n in enumerate(names)}
    if "pass_rate" in names:
        pr = table[:, 1 + names.index("pass_rate")]
        stats["pass_rate"] = float(pr.mean())
        stats["solved_fraction"] = float((pr >= 1.0).double().mean())
    return table[:, 0].float(), stats


def advantages_and_stats(rewards: torch.Tensor, trainer) -> tuple[torch.Tensor, dict]:
    g = trainer.cfg.grpo
    return group_advantages(rewards, g.num_generations, g.advantage_mode), dict(reward_stats(rewards, g.num_generations))
