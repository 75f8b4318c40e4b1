"""Torch-native FP8 for the decoder's linear layers (no Transformer Engine): `torch._scaled_mm` on
CUDA (Hopper+), the same math emulated in fp32 elsewhere (CPU tests).

Recipe as TE's `DelayedScaling` HYBRID/E4M3: activations and weights in float8_e4m3fn (max 448),
gradients in float8_e5m2 (max 57344) for "hybrid" (e4m3 for "e4m3"); tensorwise scales,
`scale = fp8_max / amax / 2**margin` with amax the max over an amax history of `history_len`
steps that INCLUDES the current tensor (so nothing overflows; history 1 = current scaling); a zero
or non-finite amax keeps the previous scale (TE's rule). The amax is all-reduced (MAX) over
`amax_group` when given (TP ranks of a sharded tensor share one scale, as TE's fp8_group).

    from megatron_diffu.model.fp8 import Fp8Recipe, enable_fp8
    enable_fp8(model, Fp8Recipe("hybrid"))   # every ColumnParallel/RowParallel linear of the decoder
    enable_fp8(model, None)                  # back to bf16

The output layer (logits) and attention stay in the compute dtype, as in TE. Weights are cast
per forward (the fp32 master lives in the optimizer); FP8 shapes: `_scaled_mm` wants both dims
of each operand divisible by 16 (`check_fp8_shapes`).
"""
from __future__ import annotations

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
    amax_group: object = None  # process group for the amax all-reduce (TP), None = local

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3


class ScalingState:
    """Amax history and scale of one tensor role (input, weight or grad) of one linear."""

    def __init__(self, history_len: int, dtype: torch.dtype, margin: int = 0, device=None):
        self.dtype, self.margin = dtype, margin
        self.history = torch.zeros(max(1, history_len), dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """Record amax(|x|), return the scale to use for x (fp32 scalar tensor)."""
        amax = x.detach().abs().amax().float()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        if self.history.device != amax.device:
            self.history, self.scale = self.history.to(amax.device), self.scale.to(amax.device)
        self.history = torch.cat([amax.reshape(1), self.history[:-1]])
        self.scale = compute_scale(self.history.max(), self.scale, FP8_MAX[self.dtype], self.margin)
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


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, state):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = state.input.update(x2, state.recipe.amax_group)
        sw = state.weight.update(w, state.recipe.amax_group)
        xq, wq = cast_to_fp8(x2, sx, E4M3), cast_to_fp8(w, sw, E4M3)
        ctx.save_for_backward(xq, sx.clone(), wq, sw.clone())
        ctx.state, ctx.shape, ctx.dtype = state, shape, x.dtype
        return fp8_mm(xq, sx, wq, sw, x.dtype).reshape(*shape[:-1], w.shape[0])

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
        if not torch.is_grad_enabled() and not getattr(self.recipe, "no_grad_fp8", False):
            return torch.nn.functional.linear(x, w, b)  # no-grad passes in the compute dtype
        y = _Fp8Linear.apply(x, w, self)
        return y if b is None else y + b

    def state_dict(self) -> dict:
        return {k: (getattr(self, k).history.cpu(), getattr(self, k).scale.cpu()) for k in ("input", "weight", "grad")}

    def load_state_dict(self, sd: dict) -> None:
        for k, (h, s) in sd.items():
            getattr(self, k).history, getattr(self, k).scale = h.clone(), s.clone()


def check_fp8_shapes(tokens: int, in_features: int, out_features: int) -> list[str]:
    """Problems of a linear's FP8 GEMMs: `_scaled_mm` wants every dim of both operands % 16."""
    bad = [f"{n}={v}" for n, v in (("tokens", tokens), ("in_features", in_features),
                                   ("out_features", out_features)) if v % 16]
    return [f"FP8 linear needs multiples of 16: {', '.join(bad)} (pad the micro-batch or sequence)"] if bad else []


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
