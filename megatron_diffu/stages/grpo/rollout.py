"""Rollouts: G completions per prompt from the diffusion sampler, identical on every rank.

Completion row g of a rollout batch belongs to prompt g // G and has the global sample index
k * global_batch_size + g, which keys its sampler generator, so a row decodes the same on any
TP/DP layout and after a resume. Each DP rank generates its rows (in chunks of
`grpo.rollout_batch_size`), left-padded to the batch's longest prompt P, then the rows are
all-gathered over DP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_diffu.diffusion.sampling import diffusion_generate
from megatron_diffu.model.fp8 import fp8_suspended


@dataclass
class RolloutBuffer:
    """One rollout batch, identical on every rank (CPU tensors; all global rows)."""

    rollout_index: int
    tokens: torch.Tensor           # [R, L] left-padded prompt + completion
    real: torch.Tensor             # [R, L] bool, False on left padding
    prompt_length: int             # P (padded)
    completion_mask: torch.Tensor  # [R, L] bool
    sample_index: torch.Tensor     # [R] long
    rewards: torch.Tensor          # [R] fp32 (weighted total)
    advantages: torch.Tensor       # [R] fp32
    old_logp: list = field(default_factory=list)  # per inner iteration: [R, L] fp32 or None
    ref_logp: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def maskable(self) -> torch.Tensor:
        m = torch.zeros_like(self.real)
        m[:, self.prompt_length:] = True
        return m


def completion_mask_from(tokens: torch.Tensor, prompt_length: int, stop_ids: list[int]) -> torch.Tensor:
    """[R, L] bool: generated positions up to and including the first stop token (all if none)."""
    gen = tokens[:, prompt_length:]
    stop = torch.zeros_like(gen, dtype=torch.bool)
    for s in stop_ids:
        stop |= gen == s
    # positions strictly after the first stop: the cumulative count of stops BEFORE them is > 0
    before = torch.cumsum(stop.long(), dim=1) - stop.long()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, prompt_length:] = before == 0
    return mask


def real_token_mask(tokens: torch.Tensor, prompt_length: int, prompt_lengths: list[int]) -> torch.Tensor:
    """[R, L] bool: False on each row's left padding (its prompt is `prompt_lengths[r]` long)."""
    real = torch.zeros_like(tokens, dtype=torch.bool)
    for r, n in enumerate(prompt_lengths):
        real[r, prompt_length - n:] = True
    return real


def gather_dp(t: torch.Tensor, grid) -> torch.Tensor:
    """Concatenate every DP rank's rows (rank order)."""
    if grid.dp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(grid.dp_size)]
    dist.all_gather(parts, t.contiguous(), group=grid.dp_group)
    return torch.cat(parts)


def bcast_from_last_stage(t: torch.Tensor, grid) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage."""
    if grid.pp_size == 1:
        return t
    t = t.contiguous()
    dist.broadcast(t, src=grid.pp_ranks[-1], group=grid.pp_group)
    return t


def generate_rows(trainer, prompts: list[list[int]], sample_index: list[int], prompt_length: int, *,
                  mask_id: int, pad_id: int, stop_ids: list[int]) -> torch.Tensor:
    """This DP rank's completions, left-padded to `prompt_length`: [rows, P + N] (CPU)."""
    chunk = trainer.cfg.grpo.rollout_batch_size or max(len(prompts), 1)
    out = []
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for lo in range(0, len(prompts), chunk):
            # the sampler runs in the compute dtype even with model.fp8_no_grad: its GEMM shapes
            # (prompt lengths, blocks, cache prefixes) follow the data, so no start-up check covers them
            with fp8_suspended():
                res = diffusion_generate(trainer.model, prompts[lo:lo + chunk], trainer.cfg.sampling, mask_id=mask_id,
                                         pad_id=pad_id, stop_ids=stop_ids, grid=trainer.grid,
                                         sample_index=sample_index[lo:lo + chunk])
            seq = res.sequences.cpu()
            pad = prompt_length - res.prompt_length
            if pad:
                seq = torch.cat([torch.full((seq.shape[0], pad), pad_id, dtype=seq.dtype), seq], 1)
            out.append(seq)
    finally:
        trainer.model.train(was_training)
    return torch.cat(out)


def local_rows(trainer) -> range:
    """The global rows of the rollout batch that this DP rank trains on (and generates)."""
    per = trainer.global_batch_size // trainer.grid.dp_size
    return range(trainer.grid.dp_rank * per, (trainer.grid.dp_rank + 1) * per)
