"""Torch-native FP8 for the decoder's linear layers (no Transformer Engine): `torch._scaled_mm` on
CUDA (Hopper+), the same math emulated in fp32 elsewhere (CPU tests).

Recipe as TE's `DelayedScaling` HYBRID/E4M3: activations and weights in float8_e4m3fn (max 448),
gradients in float8_e5m2 (max 57344) for "hybrid" (e4m3 for "e4m3"); tensorwise scales,
`scale = fp8_max / amax / 2**margin` with amax the max over an amax history of `history_len`
steps that INCLUDES the current tensor (so nothing overflows; history 1 = current scaling); a zero
or non-finite amax keeps the previous scale (TE's rule). The amax of a training pass is
all-reduced (MAX) over `amax_group`, the TP x DP ranks of this pipeline stage (Megatron's amax
reduction group, TE's fp8_group): every rank holding a shard or a replica of the weight uses one
scale. No-grad passes run in the compute dtype unless `no_grad_fp8` (then their amax is reduced
over `no_grad_amax_group`, TP only: DP ranks may run different numbers of them); inside
`fp8_suspended()` (the sampler) never. `fp8_state_entries` / `load_fp8_state_entries` carry the
scaling state through checkpoints (ALGORITHMS.md sec. 11).

    from megatron_diffu.model.fp8 import Fp8Recipe, enable_fp8
    enable_fp8(model, Fp8Recipe("hybrid"))   # every ColumnParallel/RowParallel linear of the decoder
    enable_fp8(model, None)                  # back to bf16

The output layer (logits) and attention stay in the compute dtype, as in TE. Weights are cast
per forward (the fp32 master lives in the optimizer); FP8 shapes: `_scaled_mm` wants both dims
of each operand divisible by 16 (`check_fp8_shapes`; start-up checks in model/fp8_shapes.py).
"""
from __future__ import annotations

import collections
import contextlib
import pickle
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}


@dataclass
class Fp8Recipe:
    format: str = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients; e4m3: e4m3 everywhere
    margin: int = 0
    amax_history_len: int = 16
    amax_group: object = None  # amax all-reduce of training passes (TP x DP of the stage), None = local
    no_grad_fp8: bool = False  # no-grad passes in FP8 too (default: in the compute dtype)
    no_grad_amax_group: object = None  # amax all-reduce of no-grad FP8 passes (TP), None = local

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3


class ScalingState:
    """Amax history and scale of one tensor role (input, weight or grad) of one linear."""

    def __init__(self, history_len: int, dtype: torch.dtype, margin: int = 0, device=None):
        self.dtype, self.margin = dtype, margin
        self.history = torch.zeros(max(1, history_len), dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.replay: collections.deque = collections.deque()  # scales of recorded forwards (FIFO)

    def update(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """Record amax(|x|), return the scale to use for x (fp32 scalar tensor). Under full
        recompute (`recompute_contexts`) the forward also queues the scale, and the recomputation
        takes it back instead of recording x a second time."""
        if _RECOMPUTE_MODE[-1] == "replay":
            if not self.replay:
                raise RuntimeError("FP8 recompute: no scale recorded for this tensor by the forward "
                                   "(the recomputation runs more FP8 linears than the forward did)")
            return self.replay.popleft()
        amax = x.detach().abs().amax().float()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        if self.history.device != amax.device:
            self.history, self.scale = self.history.to(amax.device), self.scale.to(amax.device)
        self.history = torch.cat([amax.reshape(1), self.history[:-1]])
        self.scale = compute_scale(self.history.max(), self.scale, FP8_MAX[self.dtype], self.margin)
        if _RECOMPUTE_MODE[-1] == "record":
            self.replay.append(self.scale)  # never modified in place: update() makes a new tensor
        return self.scale


def compute_scale(amax: torch.Tensor, previous: torch.Tensor, fp8_max: float, margin: int = 0) -> torch.Tensor:
    """TE's `_default_sf_compute`: fp8_max / amax / 2**margin; keep `previous` where amax is 0 or
    the result is not finite."""
    sf = (fp8_max / amax) / (2.0 ** margin)
    sf = torch.where(amax > 0.0, sf, previous)
    return torch.where(torch.isfinite(amax), sf, previous)


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast of x * scale to `dtype` (the fp8 payload; dequantise with 1 / scale)."""
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """(a / a_scale) @ (b_t / b_scale).T for fp8 a [M, K], b_t [N, K]: `torch._scaled_mm` on CUDA
    (a row-major, b column-major), an fp32 emulation of the same math elsewhere."""
    inv_a, inv_b = a_scale.reciprocal(), b_scale.reciprocal()
    if a.is_cuda:
        return torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), scale_a=inv_a, scale_b=inv_b,
                                out_dtype=out_dtype)
    return ((a.float() * inv_a) @ (b_t.float() * inv_b).t()).to(out_dtype)


_SUSPENDED = [0]  # depth of fp8_suspended() blocks (a list: mutable module state, no global statement)


_RECOMPUTE_MODE: list = [None]  # stack: None | "record" (checkpointed forward) | "replay" (its recompute)


@contextlib.contextmanager
def _recompute_mode(mode: str):
    _RECOMPUTE_MODE.append(mode)
    try:
        yield
    finally:
        _RECOMPUTE_MODE.pop()


def recompute_contexts():
    """`context_fn` of torch.utils.checkpoint for layers with FP8 linears (Transformer Engine's
    checkpoint does the same with its FP8 metadata): the checkpointed forward records amaxes as usual
    and queues each scale it used; the recomputation in the backward reuses those scales, records no
    amax and runs no amax all-reduce. Without it every recomputed step would enter each amax history
    twice and could quantise the recomputed activations with another scale than the forward's.
    FIFO per scaling state, which is the order in which pipeline schedules run the backwards of
    their micro-batches."""
    return _recompute_mode("record"), _recompute_mode("replay")


@contextlib.contextmanager
def fp8_suspended():
    """Every FP8 linear (native and TE, see te_backend.fp8_context) runs in the compute dtype inside:
    the sampler, whose shapes (prompt lengths, blocks, cache prefixes) depend on the data."""
    _SUSPENDED[0] += 1
    try:
        yield
    finally:
        _SUSPENDED[0] -= 1


def fp8_runs_now(no_grad_fp8: bool) -> bool:
    """Whether an FP8 layer computes in FP8 now: training passes (grad enabled) do; no-grad passes
    only with `no_grad_fp8`; nothing inside `fp8_suspended()`."""
    return not _SUSPENDED[0] and (torch.is_grad_enabled() or bool(no_grad_fp8))


def _fp8_forward(x, w, state, group):
    x2 = x.reshape(-1, x.shape[-1])
    sx = state.input.update(x2, group)
    sw = state.weight.update(w, group)
    xq, wq = cast_to_fp8(x2, sx, E4M3), cast_to_fp8(w, sw, E4M3)
    y = fp8_mm(xq, sx, wq, sw, x.dtype).reshape(*x.shape[:-1], w.shape[0])
    return y, (xq, sx.clone(), wq, sw.clone())


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, state):
        y, saved = _fp8_forward(x, w, state, state.recipe.amax_group)
        ctx.save_for_backward(*saved)
        ctx.state, ctx.shape, ctx.dtype = state, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xq, sx, wq, sw = ctx.saved_tensors
        st = ctx.state
        g2 = gy.reshape(-1, gy.shape[-1])
        sg = st.grad.update(g2, st.recipe.amax_group)
        gq = cast_to_fp8(g2, sg, st.recipe.grad_dtype)
        gx = fp8_mm(gq, sg, wq.t(), sw, ctx.dtype)  # [N, out] @ [out, in]
        gw = fp8_mm(gq.t(), sg, xq.t(), sx, ctx.dtype)  # [out, N] @ [N, in]
        return gx.reshape(ctx.shape), gw, None


class Fp8LinearState:
    """The three scaling states of one linear layer; `linear(x, w2d, b)` is F.linear in FP8."""

    def __init__(self, recipe: Fp8Recipe, device=None):
        n, m = recipe.amax_history_len, recipe.margin
        self.recipe = recipe
        self.input = ScalingState(n, E4M3, m, device)
        self.weight = ScalingState(n, E4M3, m, device)
        self.grad = ScalingState(n, recipe.grad_dtype, m, device)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not fp8_runs_now(self.recipe.no_grad_fp8):
            return torch.nn.functional.linear(x, w, b)  # no-grad passes / the sampler in the compute dtype
        if torch.is_grad_enabled():
            y = _Fp8Linear.apply(x, w, self)
        else:  # no-grad FP8 (no_grad_fp8): nothing saved for a backward; amax over TP only
            y = _fp8_forward(x, w, self, self.recipe.no_grad_amax_group)[0]
        return y if b is None else y + b

    def state_dict(self) -> dict:
        return {k: (getattr(self, k).history.cpu(), getattr(self, k).scale.cpu()) for k in ("input", "weight", "grad")}

    def load_state_dict(self, sd: dict) -> None:
        """Restore the histories and scales; a history saved with another length keeps its newest
        entries (index 0 is the newest) and pads with zeros (zero amaxes never win the max)."""
        for k, (h, s) in sd.items():
            st = getattr(self, k)
            n = st.history.numel()
            hist = torch.zeros(n, dtype=torch.float32)
            hist[:min(n, h.numel())] = h[:n].float()
            st.history = hist.to(st.history.device)
            st.scale = s.clone().float().to(st.scale.device)


def check_fp8_shapes(tokens: int, in_features: int, out_features: int) -> list[str]:
    """Problems of a native linear's FP8 GEMMs: `_scaled_mm(a [M, K], b [K, N])` wants K and N
    % 16; forward (K=in, N=out), dgrad (K=out, N=in) and wgrad (K=tokens, N=in) make every dim % 16."""
    bad = [f"{n}={v}" for n, v in (("tokens", tokens), ("in_features", in_features),
                                   ("out_features", out_features)) if v % 16]
    return [f"FP8 linear needs multiples of 16: {', '.join(bad)} (pad the micro-batch or sequence)"] if bad else []


# ---------------------------------------------------------------------- checkpointed scaling state
def _te_state(module) -> bool:
    """A module with its own extra state (Transformer Engine's modules keep their FP8 metadata there)."""
    return type(module).get_extra_state is not torch.nn.Module.get_extra_state


def fp8_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module name: module} of every layer holding FP8 scaling state: the native FP8 linears and
    TE's modules (`get_extra_state`) when the model runs FP8 (`cfg.fp8_format`; without it TE's
    state is empty). Names use global layer ids (`decoder.layers.<id>....`), so a checkpoint entry
    finds its layer under any pipeline split."""
    te_fp8 = getattr(getattr(model, "cfg", None), "fp8_format", None) is not None
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "fp8", None), Fp8LinearState) or (te_fp8 and _te_state(m))}


def fp8_state_entries(model: torch.nn.Module) -> dict[str, bytes]:
    """{module name: pickled (kind, state)} of `fp8_modules(model)`: kind "native" holds each
    role's (amax history, scale); kind "te" the module's `get_extra_state()` (on the host)."""
    out = {}
    for name, mod in fp8_modules(model).items():
        if isinstance(getattr(mod, "fp8", None), Fp8LinearState):
            out[name] = pickle.dumps(("native", mod.fp8.state_dict()))
        else:
            extra = mod.get_extra_state()
            out[name] = pickle.dumps(("te", extra.detach().cpu() if isinstance(extra, torch.Tensor) else extra))
    return out


def load_fp8_state_entries(model: torch.nn.Module, entries: dict[str, bytes]) -> list[str]:
    """Restore what `fp8_state_entries` saved; returns the names of the FP8 modules left with
    fresh scales (no entry, or one of the other implementation)."""
    fresh = []
    for name, mod in fp8_modules(model).items():
        kind, state = pickle.loads(entries[name]) if name in entries else (None, None)
        native = isinstance(getattr(mod, "fp8", None), Fp8LinearState)
        if kind == "native" and native:
            mod.fp8.load_state_dict(state)
        elif kind == "te" and not native:
            mod.set_extra_state(state)
        else:
            fresh.append(name)
    return fresh


def enable_fp8(model: torch.nn.Module, recipe: Optional[Fp8Recipe]) -> int:
    """Attach (or with None remove) FP8 states to every parallel linear of the decoder layers;
    returns how many linears were converted."""
    from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
    decoder = getattr(model, "decoder", model)
    n = 0
    for mod in decoder.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.fp8 = None if recipe is None else Fp8LinearState(recipe, mod.weight.device)
            n += 1
    return n
