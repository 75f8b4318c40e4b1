"""Vocab-parallel cross-entropy, log-probabilities, entropy, max/argmax and top-k.

Inputs are the local vocabulary shard of the logits, ``[..., V/tp]`` (TP rank r holds the global
columns ``[r * V/tp, (r+1) * V/tp)``), in any float dtype; all math is done in fp32 and only
per-row scalars (max, sum of exps, target logit) cross the TP group: the full vocabulary is never
gathered on one rank. A ``None`` group or a group of size 1 means "no communication".
Results are replicated on every TP rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import group_rank, group_size


def vocab_range(local_vocab: int, group) -> tuple[int, int]:
    """[start, end) of this rank's global vocabulary ids."""
    start = group_rank(group) * local_vocab
    return start, start + local_vocab


def _all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        x = logits.float()
        row_max = x.max(dim=-1).values
        _all_reduce_(row_max, group, dist.ReduceOp.MAX)
        x = x - row_max.unsqueeze(-1)  # new fp32 tensor: the input logits are not modified
        start, end = vocab_range(x.shape[-1], group)
        outside = (target < start) | (target >= end)
        local_t = (target - start).masked_fill(outside, 0)
        target_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce_(target_logit, group)
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        _all_reduce_(sum_exp, group)
        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, outside)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax  # d CE / d logits = softmax - onehot(target); reuse the saved buffer
        onehot_hit = (~outside).float()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -onehot_hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-row cross-entropy [...] (fp32) of local logit shards [..., V/tp] against global target ids.

    Differentiable w.r.t. `logits`. Memory: one fp32 copy of the local shard (softmax, reused
    in place by backward, like Megatron's; so backward runs once: retain_graph re-use raises).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree "
                         f"(expected logits [..., V/tp] and target [...])")
    return _VocabParallelCE.apply(logits, target, tp_group)


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log p(target) per row (fp32) = -cross-entropy; differentiable."""
    return -vocab_parallel_cross_entropy(logits, target, tp_group)


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Sum of per-rank partials into a replicated result: all-reduce forward, identity backward
    (each rank's consumer of the result computes the same thing, so its gradient is already the
    full gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceSumBothWays(torch.autograd.Function):
    """Sum of per-rank partials that then feeds per-rank *partial* computations (the log-partition
    function used by each rank's vocabulary shard): all-reduce forward AND backward, because each
    rank's gradient w.r.t. the sum is only its own shard's contribution."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce_(g.clone(), ctx.group), None


def _log_softmax_parts(logits: torch.Tensor, group):
    """(shifted local logits x - max, log of the global sum of exp) in fp32; differentiable."""
    x = logits.float()
    with torch.no_grad():
        row_max = x.max(dim=-1, keepdim=True).values
        _all_reduce_(row_max, group, dist.ReduceOp.MAX)
    x = x - row_max
    sum_exp = x.exp().sum(dim=-1, keepdim=True)
    if group_size(group) > 1:
        sum_exp = _AllReduceSumBothWays.apply(sum_exp, group)
    return x, sum_exp.log()


def vocab_parallel_entropy(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Entropy -sum_v p_v log p_v per row (fp32); differentiable."""
    x, log_z = _log_softmax_parts(logits, tp_group)
    logp = x - log_z
    plogp = (logp.exp() * logp).sum(dim=-1)
    if group_size(tp_group) > 1:
        plogp = _AllReduceSumIdentityGrad.apply(plogp, tp_group)
    return -plogp


def vocab_parallel_log_softmax_local(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """This rank's shard of log_softmax over the global vocabulary, [..., V/tp] fp32.
    Differentiable, provided per-row results are combined over TP with a sum whose backward is
    the identity (as `vocab_parallel_entropy` does)."""
    x, log_z = _log_softmax_parts(logits, tp_group)
    return x - log_z


@torch.no_grad()
def vocab_parallel_max(logits: torch.Tensor, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max value fp32, global argmax id) per row; ties go to the smallest global id."""
    x = logits.float()
    values, idx = x.max(dim=-1)
    start, _ = vocab_range(x.shape[-1], tp_group)
    idx = idx + start
    if group_size(tp_group) == 1:
        return values, idx
    gmax = values.clone()
    _all_reduce_(gmax, tp_group, dist.ReduceOp.MAX)
    big = torch.iinfo(torch.long).max
    cand = torch.where(values == gmax, idx, torch.full_like(idx, big))
    _all_reduce_(cand, tp_group, dist.ReduceOp.MIN)
    return gmax, cand


def vocab_parallel_argmax(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    return vocab_parallel_max(logits, tp_group)[1]


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (fp32 values, global ids) per row, sorted descending: gathers only k candidates per rank."""
    x = logits.float()
    k_local = min(k, x.shape[-1])
    values, idx = x.topk(k_local, dim=-1)
    idx = idx + vocab_range(x.shape[-1], tp_group)[0]
    n = group_size(tp_group)
    if n > 1:
        vs = [torch.empty_like(values) for _ in range(n)]
        ids = [torch.empty_like(idx) for _ in range(n)]
        dist.all_gather(vs, values.contiguous(), group=tp_group)
        dist.all_gather(ids, idx.contiguous(), group=tp_group)
        values, idx = torch.cat(vs, dim=-1), torch.cat(ids, dim=-1)
    top, pos = values.topk(min(k, values.shape[-1]), dim=-1)
    return top, idx.gather(-1, pos)


def gather_vocab_parallel_logits(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Full-vocabulary logits (for tests and small debugging only: this is the gather we avoid)."""
    n = group_size(tp_group)
    if n == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(n)]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)
