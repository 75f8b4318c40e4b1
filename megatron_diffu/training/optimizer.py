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
parameter counts once: TP-replicated parameters only on TP rank 0, the tied embedding copy of
the last pipeline stage not at all; sum of squares all-reduced over the model-parallel group (and
the DP group when sharded). A parameter is TP-sharded when the model's `canonical_parameters()`
gives it a shard dim, or (a module outside ours) when it carries `tp_shard_dim`, or Megatron /
Transformer Engine's `tensor_model_parallel=True` (+ `partition_dim`). The squares are summed in
chunks of `_DOT_CHUNK` elements (CUDA's dot refuses more than 2^31).

Names and shapes: every entry is keyed by its CANONICAL global name and shape (DESIGN.md), found
by matching `model.canonical_parameters()` views to the parameters they view (Transformer Engine
keeps 2-D parameters under its own names, e.g. `linear_qkv.layer_norm_weight` = canonical
`input_layernorm.weight`, fc1 [2F/tp, H] = canonical [2, F/tp, H]), so optimizer state saved by
one implementation resumes in the other and reshards like the weights.

Memory: param buffer (model dtype) + fp32 grads + fp32 master (unless fp32 without ZeRO) +
exp_avg + exp_avg_sq.

Update kernels. fp32 models (default): the per-op formula below (clip + ~8 elementwise ops, run
chunk by chunk of `_STEP_CHUNK` elements so a chunk stays in cache between them; the denominator
in a scratch of one chunk, not a fourth full fp32 buffer), which reproduces earlier runs bit for bit. bf16/fp16 models (default), or `fused=True` / the class
attribute `use_fused`: torch's fused AdamW kernel (`torch._fused_adamw_`, what
`torch.optim.AdamW(fused=True)` runs; CPU and CUDA), one pass over p, g, m, v with the clip factor
folded in as its `grad_scale` (100M fp32 parameters on a 2-core CPU: ~0.08 s instead of ~0.45 s).
It rounds differently from the per-op formula: 1 ulp on ~1e-4 of the fp32 master elements per
step, far below a bf16 parameter's resolution, but enough to move a near-zero GRPO loss/KL of a
tiny fp32 run by a few % after two steps (Adam turns float-noise gradients into lr-sized steps),
hence per-op for fp32. Its vectorised body and scalar tail also round differently, so the views
are cut at multiples of `_ALIGN` elements of the flat buffer (ZeRO shards padded to that): every
element takes the same path whatever the DP layout or thread count.

Checkpoint state is handed out one parameter at a time (`iter_state_tensors`), gathered over
DP per parameter when sharded, so a save never holds more than one parameter's state in flight
on the device.

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


_DOT_CHUNK = 1 << 28  # elements per dot in grad_norm (CUDA refuses > 2^31; results identical below it)
_STEP_CHUNK = 1 << 19  # elements per Adam chunk (2 MB/array: cache-resident between its ~9 ops; 2^19 vs 2^25:
# 100M fp32 params ~0.10 s vs ~0.16 s on 2 cores); the denominator scratch is this big, not a 4th buffer
_ALIGN = 64  # fused-kernel views start/end at multiples of this (>= 2 AVX-512 vectors) of the flat buffer
_FUSED = getattr(torch, "_fused_adamw_", None)


@dataclass
class _Entry:
    name: str  # canonical global name
    param: nn.Parameter
    shape: tuple  # canonical local shape (a view of the parameter's storage)
    shard_dim: Optional[int]  # TP shard dim of the canonical shape, None = replicated
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

    def __init__(self, model: nn.Module, cfg, grid, use_distributed_optimizer: bool = False,
                 fused: Optional[bool] = None, gradient_accumulation_fusion: bool = False):
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
        canonical = canonical_index(model)
        entries = []
        for n, p in params:
            name, shape, shard_dim = canonical.get(id(p), (n, tuple(p.shape), param_shard_dim(p)))
            replicated = shard_dim is None
            tied_copy = (name == "embedding.word_embeddings.weight" and not pre and grid.pp_size > 1)
            counted = not tied_copy and (not replicated or tp_rank == 0)
            entries.append(_Entry(name, p, shape, shard_dim, 0, p.numel(),
                                  decay=p.dim() > 1 and not name.endswith(".bias"),
                                  counted=counted, sp_reduce=bool(getattr(p, "sequence_parallel", False)),
                                  tied_copy=tied_copy))
        entries.sort(key=lambda e: (not e.decay, not e.counted))  # stable: model order within a class
        off = 0
        for e in entries:
            e.start, off = off, off + e.numel
        self.numel = off
        pad = (-off) % (self.dp_size * _ALIGN) if self.distributed else 0  # shard bounds aligned: see _fused_views
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
                    # our linears / embedding then add dW into it inside the GEMM (parallel/layers.py)
                    e.param.fuse_wgrad_accumulation = bool(gradient_accumulation_fusion)
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
        self._scratch_buf: Optional[torch.Tensor] = None  # the per-op path's denominator (lazy)
        self.step_count = 0
        self._segments = self._build_segments()
        if fused is None:  # auto: fused for bf16/fp16 models (its 1-ulp master rounding is far below theirs)
            fused = self.use_fused if self.use_fused is not None else self.dtype != torch.float32
        want = bool(fused)
        self.fused = want and _FUSED is not None and self.device.type in ("cpu", "cuda")
        self._fp32_entries = [e for e in entries if e.param.dtype == torch.float32]
        self._other_entries = [e for e in entries if e.param.dtype != torch.float32]
        self._sp_entries = [e for e in entries if e.sp_reduce]  # the per-step lists, built once
        self._emb_entries = [e for e in entries if e.name == "embedding.word_embeddings.weight"]
        if self.fused:
            self._step_t = torch.zeros((), dtype=torch.float32, device=self.device)
            self._scale_t = torch.ones((), dtype=torch.float32, device=self.device)
            self._views = self._fused_views()

    use_fused: Optional[bool] = None  # class default: None = fused for bf16/fp16 models only (module doc)

    @property
    def _scratch(self) -> torch.Tensor:
        """Adam's denominator for the per-op path, one chunk (`_STEP_CHUNK`) at a time."""
        if self._scratch_buf is None:
            self._scratch_buf = torch.empty(min(self.hi - self.lo, _STEP_CHUNK), dtype=torch.float32,
                                            device=self.device)
        return self._scratch_buf

    def _fused_views(self) -> dict[bool, tuple[list, list, list, list]]:
        """{decay: (master, grad, exp_avg, exp_avg_sq) views} for the fused kernel: each segment cut
        at multiples of `_ALIGN` of the flat buffer, so an element lies in the same (aligned body /
        unaligned edge) view whatever the shard bounds (themselves multiples of `_ALIGN`)."""
        g = self.grad_buffer[self.lo:self.hi]
        views: dict[bool, tuple[list, list, list, list]] = {True: ([], [], [], []), False: ([], [], [], [])}
        for sa, sb, decay, _ in self._segments:
            a, b = self.lo + sa, self.lo + sb  # flat-buffer offsets
            head, tail = min(b, -(-a // _ALIGN) * _ALIGN), max(a, b // _ALIGN * _ALIGN)
            for x, y in ((a, head), (head, tail), (tail, b)) if head < tail else ((a, b),):
                if x < y:
                    x, y = x - self.lo, y - self.lo
                    for lst, t in zip(views[decay], (self.master, g, self.exp_avg, self.exp_avg_sq)):
                        lst.append(t[x:y])
        return views

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
        for e in self._fp32_entries:
            grad = e.param.grad
            if grad is None or grad.data_ptr() != e.param.main_grad.data_ptr():
                if grad is not None:  # someone replaced .grad: keep its value, re-point
                    e.param.main_grad.copy_(grad)
                e.param.grad = e.param.main_grad
        for e in self._other_entries:
            e.param.grad = None

    def reduce_gradients(self) -> None:
        """After all micro-batches: SP norm grads over TP, tied embeddings over the embedding
        group, then everything over DP (sum; ZeRO: reduce-scatter)."""
        sp = self._sp_entries
        if sp and group_size(self.grid.tp_group) > 1:
            _allreduce_views([e.param.main_grad for e in sp], self.grid.tp_group)
        emb = self._emb_entries
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
                for c in range(a, b, _DOT_CHUNK):  # BLAS dot: fast; the sum over chunks in fp64
                    seg = g[c:min(b, c + _DOT_CHUNK)]
                    sq += torch.dot(seg, seg).double()
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
        clip = bool(cfg.clip_grad and grad_norm is not None and grad_norm > cfg.clip_grad)
        self.step_count += 1
        if self.fused:
            self._fused_step(lr, (grad_norm + 1e-6) / cfg.clip_grad if clip else None)
        else:
            self._per_op_step(lr, g, cfg.clip_grad / (grad_norm + 1e-6) if clip else None)
        if not self.master_is_param:
            self.param_buffer[self.lo:self.hi].copy_(self.master)
        if self.distributed:
            self._all_gather_params()

    def _fused_step(self, lr: float, inv_clip: Optional[float]) -> None:
        """torch's fused AdamW over the aligned views; clipping = dividing the gradient by
        `inv_clip` inside the kernel (which leaves the clipped gradient in the buffer)."""
        cfg = self.cfg
        self._step_t.fill_(float(self.step_count))
        scale = None
        if inv_clip is not None:
            scale = self._scale_t.fill_(inv_clip)
        for decay, (p, g, m, v) in self._views.items():
            if p:
                _FUSED(p, g, m, v, [], [self._step_t] * len(p), lr=lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2,
                       weight_decay=cfg.weight_decay if decay else 0.0, eps=cfg.adam_eps, amsgrad=False,
                       maximize=False, grad_scale=scale, found_inf=None)

    def _per_op_step(self, lr: float, g: torch.Tensor, clip_coef: Optional[float]) -> None:
        cfg = self.cfg
        b1, b2 = cfg.adam_beta1, cfg.adam_beta2
        bc1, bc2 = 1.0 - b1 ** self.step_count, 1.0 - b2 ** self.step_count
        for sa, sb, decay, _ in self._segments:  # elementwise: chunking changes no bit
            for a in range(sa, sb, _STEP_CHUNK):
                b = min(sb, a + _STEP_CHUNK)
                p, m, v, gr = self.master[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b], g[a:b]
                if clip_coef is not None:  # per chunk, while it is in cache; the buffer is zeroed next step
                    gr.mul_(clip_coef)
                if decay and cfg.weight_decay:
                    p.mul_(1.0 - lr * cfg.weight_decay)
                m.lerp_(gr, 1.0 - b1)
                v.mul_(b2).addcmul_(gr, gr, value=1.0 - b2)
                denom = torch.sqrt(v, out=self._scratch[:b - a]).div_(math.sqrt(bc2)).add_(cfg.adam_eps)
                p.addcdiv_(m, denom, value=-lr / bc1)

    def _all_gather_params(self) -> None:
        size = self.hi - self.lo
        if "nccl" in _backend(self.dp_group):
            dist.all_gather_into_tensor(self.param_buffer, self.param_buffer[self.lo:self.hi].clone(), group=self.dp_group)
            return
        chunks = [torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(self.dp_size)]
        dist.all_gather(chunks, self.param_buffer[self.lo:self.hi].contiguous(), group=self.dp_group)
        self.param_buffer.copy_(torch.cat(chunks))

    # ------------------------------------------------------------------ checkpoint state
    def state_kinds(self) -> list[str]:
        """The saved state kinds: Adam's moments, plus the fp32 master unless it is the parameter."""
        return ["exp_avg", "exp_avg_sq"] + ([] if self.dtype == torch.float32 else ["fp32_param"])

    def state_shapes(self) -> dict[str, tuple[tuple, Optional[int]]]:
        """{canonical name: (canonical local shape, TP shard dim)} of every entry."""
        return {e.name: (e.shape, e.shard_dim) for e in self.entries}

    def _flat(self, kind: str) -> torch.Tensor:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "fp32_param": self.master}[kind]

    def state_owner(self, e: _Entry) -> int:
        """The DP rank that hands out entry `e`'s state for a save (ZeRO: the owner of its first
        element; unsharded: every rank holds it and DCP's planner deduplicates)."""
        if not self.distributed:
            return self.dp_rank
        return min(e.start // (self.padded // self.dp_size), self.dp_size - 1)

    def iter_state_tensors(self, device=None):
        """Yield (kind, canonical name, local TP-shard tensor) for this rank's part of the state,
        one parameter at a time. Unsharded: views of the flat buffers (no copy). ZeRO: entry by
        entry, the pieces are sent to its owner over DP (collective: every DP rank iterates the
        same entries) and only the owner (`state_owner`) yields the tensor, copied to `device`
        (default: this optimizer's device; "cpu" keeps the device transient to one parameter)."""
        for kind in self.state_kinds():
            flat = self._flat(kind)
            for e in self.entries:
                if not self.distributed:
                    t = flat[e.start:e.start + e.numel].view(e.shape)
                    yield kind, e.name, (t if device is None else t.to(device))
                    continue
                full = _gather_entry(self, flat, e)
                if full is not None:
                    yield kind, e.name, full.view(e.shape) if device is None else full.view(e.shape).to(device)
                del full

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{kind: {canonical name: local (TP-shard) tensor}} of this rank's part of the state (see
        `iter_state_tensors`). Collective when sharded."""
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.state_kinds()}
        for kind, name, t in self.iter_state_tensors():
            out[kind][name] = t
        return out

    def needed_state_names(self) -> list[str]:
        """Canonical names whose state this rank's shard needs on load (ZeRO: those overlapping it)."""
        return [e.name for e in self.entries if max(e.start, self.lo) < min(e.start + e.numel, self.hi)]

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]], step_count: int) -> None:
        """Inverse of `state_tensors` (local TP-shard tensors per canonical name, any device; only
        `needed_state_names()` are required); fp32 masters default to the params."""
        for kind, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            _scatter_into(self, target, state.get(kind, {}), kind)
        if not self.master_is_param:
            if "fp32_param" in state:
                _scatter_into(self, self.master, state["fp32_param"], "fp32_param")
            else:
                self.master.copy_(self.param_buffer[self.lo:self.hi].float())
        self.step_count = int(step_count)

    def sync_master_from_params(self) -> None:
        """After loading model weights into the parameters: refresh the fp32 master copy."""
        if not self.master_is_param:
            self.master.copy_(self.param_buffer[self.lo:self.hi].float())


def _gather_entry(opt: "MixedPrecisionAdamW", flat: torch.Tensor, e: _Entry) -> Optional[torch.Tensor]:
    """Entry `e`'s range of a ZeRO-sharded flat state, assembled on its owner (1-D fp32; None
    on the other ranks): the DP ranks holding pieces send them point to point, so the device
    transient is one parameter on the owner and nothing on the senders."""
    size = opt.padded // opt.dp_size
    owner = opt.state_owner(e)
    spans = [(max(e.start, r * size), min(e.start + e.numel, (r + 1) * size)) for r in range(opt.dp_size)]
    ranks = getattr(opt.grid, "dp_ranks", None) or list(range(opt.dp_size))
    if opt.dp_rank != owner:
        a, b = spans[opt.dp_rank]
        if b > a:
            dist.send(flat[a - opt.lo:b - opt.lo].contiguous(), dst=ranks[owner], group=opt.dp_group)
        return None
    full = torch.empty(e.numel, dtype=flat.dtype, device=flat.device)
    for r, (a, b) in enumerate(spans):
        if b <= a:
            continue
        if r == opt.dp_rank:
            full[a - e.start:b - e.start].copy_(flat[a - opt.lo:b - opt.lo])
        else:
            dist.recv(full[a - e.start:b - e.start], src=ranks[r], group=opt.dp_group)
    return full


def _scatter_into(opt: "MixedPrecisionAdamW", shard: torch.Tensor, tensors: dict[str, torch.Tensor], kind: str) -> None:
    for e in opt.entries:
        a, b = max(e.start, opt.lo), min(e.start + e.numel, opt.hi)
        if a >= b:
            continue
        if e.name not in tensors:
            raise KeyError(f"optimizer state {kind} of {e.name} missing from the checkpoint "
                           f"(use --no-load-optim to start the optimizer fresh)")
        flat = tensors[e.name].reshape(-1)
        shard[a - opt.lo:b - opt.lo].copy_(flat[a - e.start:b - e.start].to(shard.device, shard.dtype))


def param_shard_dim(p: torch.Tensor) -> Optional[int]:
    """TP shard dim of a parameter from its attributes: ours (`tp_shard_dim`) or Megatron /
    Transformer Engine's (`tensor_model_parallel` + `partition_dim`); None = replicated."""
    d = getattr(p, "tp_shard_dim", None)
    if d is not None:
        return int(d)
    if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0:
        return int(p.partition_dim)
    return None


def canonical_index(model: nn.Module) -> dict[int, tuple[str, tuple, Optional[int]]]:
    """id(parameter) -> (canonical name, canonical local shape, TP shard dim) from the model's
    `canonical_parameters()` (views are matched to the parameter they view); empty without it."""
    fn = getattr(model, "canonical_parameters", None)
    if fn is None:
        return {}
    params = {id(p): p for p in model.parameters()}
    by_ptr = {}
    for p in params.values():
        if p.device.type != "meta":
            by_ptr.setdefault((p.data_ptr(), p.numel()), p)
    out = {}
    for name, (t, dim) in fn().items():
        base = t if id(t) in params else t._base
        p = base if base is not None and id(base) in params else None
        if p is None and t.device.type != "meta":
            p = by_ptr.get((t.data_ptr(), t.numel()))
        if p is not None and t.numel() == p.numel():
            out[id(p)] = (name, tuple(t.shape), dim)
    return out


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
