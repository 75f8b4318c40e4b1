"""Tensor- and sequence-parallel building blocks (Megatron style) on plain torch.distributed.

Activations are ``[B, S, H]`` (batch first). With sequence parallelism the *sequence* dim
(``seq_dim``, default 1) is split across the TP ranks between the linears; the column-parallel
linear all-gathers it on the way in and the row-parallel linear reduce-scatters it on the way out.

Every function/module treats a ``None`` group or a group of size 1 as "no communication", so the
same model code runs in one process without torch.distributed.

Parameters carry two attributes that the rest of the code relies on:
- ``tp_shard_dim``: the dim of the canonical (global) shape split over TP, or None (replicated);
- ``sequence_parallel``: True for replicated parameters whose gradient is only partial on each TP
  rank under sequence parallelism (norm weights); `allreduce_sequence_parallel_grads` sums them.
The optimizer may add two more (training/optimizer.py): ``main_grad``, the parameter's view of the
fp32 gradient buffer, and ``fuse_wgrad_accumulation``: then the linears and the embedding add
their weight gradient into ``main_grad`` themselves (`fuses_wgrad`; gradient accumulation fusion).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .state import group_rank, group_size

# torch >= 2.10 renamed the single-tensor collectives; keep working on both spellings
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------- raw collectives
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()  # never reduce in place into a tensor autograd may have saved
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} tensor-parallel ranks: "
                         f"make it divisible (sequence length for sequence parallelism)")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} tensor-parallel ranks: "
                         f"with --sequence-parallel the sequence length must be divisible by the TP size")
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim).contiguous()


# ---------------------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    """Keep this rank's chunk of `dim` forward; all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along `dim` forward; keep this rank's chunk of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    """Sequence-parallel all-gather; backward reduce-scatters (the consumers are TP-sharded ops
    whose input gradients are partial sums) or, with ``reduce_grad=False``, just splits."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad):
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        fn = _reduce_scatter if ctx.reduce_grad else _split
        return fn(g, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce-scatter along the sequence dim forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, dim, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, dim, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, seq_dim, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1,
                                         reduce_grad: bool = True) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, seq_dim, group, reduce_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, seq_dim, group)


# ---------------------------------------------------------------------- modules
def _local_shape(global_shape: Sequence[int], shard_dim: Optional[int], tp: int) -> tuple[int, ...]:
    shape = list(global_shape)
    if shard_dim is not None:
        if shape[shard_dim] % tp:
            raise ValueError(f"dim {shard_dim} of {tuple(global_shape)} is not divisible by TP size {tp}")
        shape[shard_dim] //= tp
    return tuple(shape)


def _param(global_shape, shard_dim, tp, dtype, device) -> nn.Parameter:
    p = nn.Parameter(torch.empty(_local_shape(global_shape, shard_dim, tp), dtype=dtype, device=device))
    p.tp_shard_dim = shard_dim
    p.sequence_parallel = False
    return p


# ---------------------------------------------------------------------- gradient accumulation fusion
def fuses_wgrad(weight: torch.Tensor) -> bool:
    """True when `weight`'s gradient is to be accumulated straight into its `main_grad` (Megatron's
    gradient accumulation fusion): the optimizer sets `fuse_wgrad_accumulation` on the fp32
    parameters it owns (`--no-gradient-accumulation-fusion` turns it off). Only where the weight and
    its main_grad share a dtype: a bf16 weight's fp32 accumulation would need a mixed-dtype GEMM."""
    main_grad = getattr(weight, "main_grad", None)
    return (getattr(weight, "fuse_wgrad_accumulation", False) and weight.requires_grad
            and torch.is_grad_enabled() and main_grad is not None and main_grad.dtype == weight.dtype)


class _LinearAccumulatingWgrad(torch.autograd.Function):
    """y = x W^T (+ b) where W is `weight` viewed as [out, in]; backward adds dW = g^T x into
    `weight.main_grad` inside the GEMM (addmm_ with beta 1) and returns no weight gradient.

    Why: the unfused backward computes dW into a new tensor and AccumulateGrad then adds it into
    the buffer: one allocation and one more pass over every weight per micro-batch, which on a CPU
    is a visible share of a step (100M model, fp32, 1 CPU process: backward 794 -> 747 ms in one
    benchmark run). The same sums, in another order of additions (the GEMM may fold the buffer in
    at any point of its reduction)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        w2 = weight.view(-1, weight.shape[-1])
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, w2, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        w2 = weight.view(-1, weight.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = (g2 @ w2).view(*g.shape[:-1], w2.shape[1]) if ctx.needs_input_grad[0] else None
        weight.main_grad.view(-1, weight.shape[-1]).addmm_(g2.t(), x.reshape(-1, x.shape[-1]))
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, None, grad_b


class _EmbeddingAccumulatingWgrad(torch.autograd.Function):
    """F.embedding whose backward index-adds the output gradient rows into `weight.main_grad`
    (fused accumulation, as above): the dense [V, H] gradient of `embedding_dense_backward` (a
    zero fill, a scatter and then an add over every row of a 151k-row table) becomes a scatter-add
    of the micro-batch's rows."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        main_grad = ctx.weight.main_grad
        main_grad.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))  # same dtype: fuses_wgrad
        ctx.weight = None
        return None, None


def linear_accumulating(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight viewed as [out, in], bias), its weight gradient fused into main_grad when
    `fuses_wgrad(weight)`."""
    if fuses_wgrad(weight):
        return _LinearAccumulatingWgrad.apply(x, weight, bias)
    return F.linear(x, weight.reshape(-1, weight.shape[-1]), bias)


def embedding_accumulating(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding(ids, weight), its weight gradient fused into main_grad when `fuses_wgrad(weight)`."""
    if fuses_wgrad(weight):
        return _EmbeddingAccumulatingWgrad.apply(ids, weight)
    return F.embedding(ids, weight)


def _linear(module: nn.Module, x, w, b=None):
    """F.linear (weight gradient fused into main_grad where the optimizer asks for it), or the
    module's torch-native FP8 linear (model/fp8.py `enable_fp8`) when attached."""
    fp8 = getattr(module, "fp8", None)
    if fp8 is not None:
        return fp8.linear(x, w.reshape(-1, w.shape[-1]), b)
    return linear_accumulating(x, w, b)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with the output features split over TP ranks.

    `weight_shape` is the canonical *global* weight shape, e.g. ``(G, (Q/G+2)*D, H)`` for the
    fused QKV; the last dim is the input size, the product of the others the output size, and
    `shard_dim` the dim split over TP. The 2-D matrix is a view taken in forward.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = False,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 weight_shape: Optional[Sequence[int]] = None, shard_dim: int = 0,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        weight_shape = tuple(weight_shape or (output_size, input_size))
        if weight_shape[-1] != input_size or torch.Size(weight_shape[:-1]).numel() != output_size:
            raise ValueError(f"weight_shape {weight_shape} does not match input {input_size} / output {output_size}")
        if shard_dim >= len(weight_shape) - 1:
            raise ValueError("a column-parallel weight must be sharded on an output dim")
        self.tp_group, self.gather_output, self.sequence_parallel = tp_group, gather_output, sequence_parallel
        tp = group_size(tp_group)
        self.weight = _param(weight_shape, shard_dim, tp, dtype, device)
        self.bias = _param(weight_shape[:-1], shard_dim, tp, dtype, device) if bias else None

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        else:
            x = copy_to_tensor_parallel_region(x, self.tp_group)
        w = self.weight if weight is None else weight
        b = None if self.bias is None else self.bias.reshape(-1)
        y = _linear(self, x, w, b)
        return gather_from_tensor_parallel_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with the input features split over TP ranks; partial sums are all-reduced
    (or reduce-scattered along the sequence under sequence parallelism). Input is already split."""

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = False,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = _param((output_size, input_size), 1, group_size(tp_group), dtype, device)
        self.bias = _param((output_size,), None, 1, dtype, device) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(self, x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over TP ranks. Output is the full hidden
    vector (all-reduced), or sequence-sharded (reduce-scattered) under sequence parallelism."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        tp, rank = group_size(tp_group), group_rank(tp_group)
        self.weight = _param((num_embeddings, embedding_dim), 0, tp, dtype, device)
        self.num_embeddings = num_embeddings
        self.vocab_start = rank * (num_embeddings // tp)
        self.vocab_end = self.vocab_start + num_embeddings // tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            out = embedding_accumulating(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = embedding_accumulating(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tensor_parallel_region(out, self.tp_group)


def allreduce_sequence_parallel_grads(module: nn.Module, tp_group) -> None:
    """Sum over TP the gradients of replicated parameters marked ``sequence_parallel`` (norm
    weights see only their sequence shard under SP). Call after backward, before clipping/step.
    One flat all-reduce for all of them."""
    if group_size(tp_group) == 1:
        return
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
