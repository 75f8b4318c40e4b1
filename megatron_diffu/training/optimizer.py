"""AdamW with fp32 master weights and fp32 gradients on flat buffers; optional ZeRO-1 sharding.

Layout: all local parameters (this rank's TP/PP shards) live as views in ONE flat buffer of the
model dtype (`param_buffer`); their gradients are accumulated in fp32 in a flat `grad_buffer`
(`main_grad` views) by post-accumulate hooks, so bf16 models get fp32 gradient accumulation and
fp32 data-parallel reduction. Parameters are ordered by (weight decay?, counted in the norm?), so
every range of the buffer is a few homogeneous segments.

Data parallel: gradients are SUMMED over the DP group (the stages normalise their losses by the
global batch). Without `use_distributed_optimizer` every DP rank keeps the full fp32 master
copy and Adam state; with it (ZeRO-1) rank r owns the r-th contiguous 1/dp of the flat buffer:
its fp32 master + Adam state only, it reduce-scatters the gradients (NCCL; gloo has no
reduce-scatter, so all-reduce + slice), updates its shard, then all-gathers the parameters.

Gradient norm (for clipping and logging): the global L2 norm over TP/PP/DP where every
parameter counts once: TP-replicated parameters (no `tp_shard_dim`) only on TP rank 0, the tied
embedding copy of the last pipeline stage not at all; sum of squares all-reduced over the
model-parallel group (and the DP group when sharded).

The Adam math is torch.optim.AdamW's (decoupled weight decay, bias correction), elementwise on
the flat shard, so a sharded and an unsharded optimizer give identical parameters. No weight
decay on biases and 1-D parameters (norms), as Megatron.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_diffu.parallel.state import group_rank, group_size


@dataclass
class _Entry:
    name: str
    param: nn.Parameter
    start: int
    numel: int
    decay: bool
    counted: bool  # counted in the gradient norm on this rank
    sp_reduce: bool  # sequence-parallel replicated: grads summed over TP
    tied_copy: bool  # last-stage copy of a tied embedding: grads summed over the embedding group


def _backend(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001
        return "gloo"


class MixedPrecisionAdamW:
    """See the module docstring. `named_params`: (global name, parameter) of this rank's model."""

    def __init__(self, model: nn.Module, cfg, grid, use_distributed_optimizer: bool = False):
        self.cfg, self.grid = cfg, grid
        self.distributed = bool(use_distributed_optimizer) and grid.dp_size > 1
        self.dp_group = grid.dp_group
        self.dp_size, self.dp_rank = group_size(self.dp_group), group_rank(self.dp_group)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.dtype = params[0][1].dtype
        self.device = params[0][1].device
        tp_rank = group_rank(grid.tp_group)
        pre = getattr(model, "pre_process", True)
        entries = []
        for n, p in params:
            replicated = getattr(p, "tp_shard_dim", None) is None
            tied_copy = (n == "embedding.word_embeddings.weight" and not pre and grid.pp_size > 1)
            counted = not tied_copy and (not replicated or tp_rank == 0)
            entries.append(_Entry(n, p, 0, p.numel(), decay=p.dim() > 1 and not n.endswith(".bias"),
                                  counted=counted, sp_reduce=bool(getattr(p, "sequence_parallel", False)),
                                  tied_copy=tied_copy))
        entries.sort(key=lambda e: (not e.decay, not e.counted))  # stable: model order within a class
        off = 0
        for e in entries:
            e.start, off = off, off + e.numel
        self.numel = off
        pad = (-off) % self.dp_size if self.distributed else 0
        self.padded = off + pad
        self.entries = entries
        self.param_buffer = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        self.grad_buffer = torch.zeros(self.padded, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for e in entries:
                view = self.param_buffer[e.start:e.start + e.numel].view_as(e.param)
                view.copy_(e.param.data)
                e.param.data = view
                e.param.main_grad = self.grad_buffer[e.start:e.start + e.numel].view_as(e.param)
                if e.param.dtype == torch.float32:
                    # autograd accumulates in place into an existing .grad: point it at the buffer
                    e.param.grad = e.param.main_grad
                else:  # bf16: fp32 accumulation through a hook, the bf16 .grad is freed at once
                    e.param.register_post_accumulate_grad_hook(_accumulate_main_grad)
        if self.distributed:
            size = self.padded // self.dp_size
            self.lo, self.hi = self.dp_rank * size, (self.dp_rank + 1) * size
        else:
            self.lo, self.hi = 0, self.padded
        shard = self.param_buffer[self.lo:self.hi]
        self.master_is_param = self.dtype == torch.float32 and not self.distributed
        self.master = shard if self.master_is_param else shard.float().clone()
        self.tied = not getattr(getattr(model, "cfg", None), "untie_embeddings_and_output_weights", True)
        self.exp_avg = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self._scratch = torch.empty_like(self.exp_avg)  # Adam's denominator, reused every step
        self.step_count = 0
        self._segments = self._build_segments()

    # ------------------------------------------------------------------ segments of my shard
    def _build_segments(self) -> list[tuple[int, int, bool, bool]]:
        """[(lo, hi, decay, counted)] relative to my shard, merged where flags agree."""
        segs: list[list] = []
        for e in self.entries:
            a, b = max(e.start, self.lo), min(e.start + e.numel, self.hi)
            if a >= b:
                continue
            if segs and segs[-1][1] == a - self.lo and segs[-1][2:] == [e.decay, e.counted]:
                segs[-1][1] = b - self.lo
            else:
                segs.append([a - self.lo, b - self.lo, e.decay, e.counted])
        return [tuple(s) for s in segs]

    # ------------------------------------------------------------------ gradients
    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        for e in self.entries:
            if e.param.dtype == torch.float32:
                if e.param.grad is None or e.param.grad.data_ptr() != e.param.main_grad.data_ptr():
                    if e.param.grad is not None:  # someone replaced .grad: keep its value, re-point
                        e.param.main_grad.copy_(e.param.grad)
                    e.param.grad = e.param.main_grad
            else:
                e.param.grad = None

    def reduce_gradients(self) -> None:
        """After all micro-batches: SP norm grads over TP, tied embeddings over the embedding
        group, then everything over DP (sum; ZeRO: reduce-scatter)."""
        sp = [e for e in self.entries if e.sp_reduce]
        if sp and group_size(self.grid.tp_group) > 1:
            _allreduce_views([e.param.main_grad for e in sp], self.grid.tp_group)
        emb = [e for e in self.entries if e.name == "embedding.word_embeddings.weight"]
        if emb and self.tied and self.grid.pp_size > 1 and getattr(self.grid, "embedding_group", None) is not None \
                and (self.grid.is_first_stage or self.grid.is_last_stage):
            dist.all_reduce(emb[0].param.main_grad, group=self.grid.embedding_group)
        if self.dp_size > 1:
            if self.distributed and "nccl" in _backend(self.dp_group):
                out = self.grad_buffer[self.lo:self.hi]
                dist.reduce_scatter_tensor(out, self.grad_buffer, group=self.dp_group)
            else:
                dist.all_reduce(self.grad_buffer, group=self.dp_group)

    def grad_norm(self) -> float:
        """Global L2 norm of the reduced gradients (each parameter counted once)."""
        g = self.grad_buffer[self.lo:self.hi]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for a, b, _, counted in self._segments:
            if counted:
                seg = g[a:b]
                sq += torch.dot(seg, seg).double()  # BLAS dot: fast; the sum over segments in fp64
        if self.distributed:
            dist.all_reduce(sq, group=self.dp_group)
        if group_size(self.grid.mp_group) > 1:
            dist.all_reduce(sq, group=self.grid.mp_group)
        return float(sq.sqrt())

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr: float, grad_norm: Optional[float] = None) -> None:
        """One AdamW step on my shard (clipping by `grad_norm` if clip_grad > 0), then sync params."""
        cfg = self.cfg
        g = self.grad_buffer[self.lo:self.hi]
        if cfg.clip_grad and grad_norm is not None and grad_norm > cfg.clip_grad:
            g.mul_(cfg.clip_grad / (grad_norm + 1e-6))  # in place: the buffer is zeroed before the next step
        self.step_count += 1
        b1, b2 = cfg.adam_beta1, cfg.adam_beta2
        bc1, bc2 = 1.0 - b1 ** self.step_count, 1.0 - b2 ** self.step_count
        for a, b, decay, _ in self._segments:
            p, m, v, gr = self.master[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b], g[a:b]
            if decay and cfg.weight_decay:
                p.mul_(1.0 - lr * cfg.weight_decay)
            m.lerp_(gr, 1.0 - b1)
            v.mul_(b2).addcmul_(gr, gr, value=1.0 - b2)
            denom = torch.sqrt(v, out=self._scratch[a:b]).div_(math.sqrt(bc2)).add_(cfg.adam_eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
        if not self.master_is_param:
            self.param_buffer[self.lo:self.hi].copy_(self.master)
        if self.distributed:
            self._all_gather_params()

    def _all_gather_params(self) -> None:
        size = self.hi - self.lo
        if "nccl" in _backend(self.dp_group):
            dist.all_gather_into_tensor(self.param_buffer, self.param_buffer[self.lo:self.hi].clone(), group=self.dp_group)
            return
        chunks = [torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(self.dp_size)]
        dist.all_gather(chunks, self.param_buffer[self.lo:self.hi].contiguous(), group=self.dp_group)
        self.param_buffer.copy_(torch.cat(chunks))

    # ------------------------------------------------------------------ checkpoint state
    def _full(self, shard: torch.Tensor) -> torch.Tensor:
        """A state buffer over the whole flat range (gathered over DP when sharded)."""
        if not self.distributed:
            return shard
        chunks = [torch.empty_like(shard) for _ in range(self.dp_size)]
        dist.all_gather(chunks, shard.contiguous(), group=self.dp_group)
        return torch.cat(chunks)

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{kind: {param name: local (TP-shard) tensor}} for exp_avg, exp_avg_sq and fp32 master
        (the latter only when it is not the parameter itself). Collective when sharded."""
        kinds = {"exp_avg": self._full(self.exp_avg), "exp_avg_sq": self._full(self.exp_avg_sq)}
        if self.dtype != torch.float32:
            kinds["fp32_param"] = self._full(self.master)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for kind, flat in kinds.items():
            out[kind] = {e.name: flat[e.start:e.start + e.numel].view_as(e.param) for e in self.entries}
        return out

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]], step_count: int) -> None:
        """Inverse of `state_tensors` (local TP-shard tensors per param); fp32 masters default to the params."""
        for kind, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            self._scatter_into(target, state.get(kind, {}), kind)
        if not self.master_is_param:
            if "fp32_param" in state:
                self._scatter_into(self.master, state["fp32_param"], "fp32_param")
            else:
                self.master.copy_(self.param_buffer[self.lo:self.hi].float())
        self.step_count = int(step_count)

    def _scatter_into(self, shard: torch.Tensor, tensors: dict[str, torch.Tensor], kind: str) -> None:
        for e in self.entries:
            if e.name not in tensors:
                raise KeyError(f"optimizer state {kind} of {e.name} missing from the checkpoint "
                               f"(use --no-load-optim to start the optimizer fresh)")
            a, b = max(e.start, self.lo), min(e.start + e.numel, self.hi)
            if a >= b:
                continue
            flat = tensors[e.name].reshape(-1).to(shard.dtype)
            shard[a - self.lo:b - self.lo].copy_(flat[a - e.start:b - e.start])

    def sync_master_from_params(self) -> None:
        """After loading model weights into the parameters: refresh the fp32 master copy."""
        if not self.master_is_param:
            self.master.copy_(self.param_buffer[self.lo:self.hi].float())


def _accumulate_main_grad(p: torch.Tensor) -> None:
    # fp32 accumulation of every micro-batch's gradient; .grad is freed right away
    p.main_grad.add_(p.grad)
    p.grad = None


def _allreduce_views(views: list[torch.Tensor], group) -> None:
    flat = torch.cat([v.reshape(-1) for v in views])
    dist.all_reduce(flat, group=group)
    off = 0
    for v in views:
        v.copy_(flat[off:off + v.numel()].view_as(v))
        off += v.numel()
