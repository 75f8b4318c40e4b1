"""Transformer Engine backend (`--transformer-impl transformer_engine`), imported lazily.

One decoder layer built from TE's TP-aware modules: `LayerNormLinear` (RMSNorm fused into the
QKV and fc1 projections), `Linear` (row-parallel proj / fc2) and `DotProductAttention` (fused /
flash attention: bidirectional, key padding as TE's "padding" mask, other masks as "arbitrary";
`attention.te_attention`). FP8 runs inside
`fp8_autocast` with a `DelayedScaling` recipe (`fp8_format` hybrid|e4m3, `fp8_margin`,
`fp8_amax_history_len`); see `fp8_context`.

Weights: TE keeps its own 2-D parameters, whose rows we lay out exactly as the local canonical
shards (a [G/tp * (Q/G+2) * D, H] QKV weight *is* the [G/tp, (Q/G+2)*D, H] shard; fc1's
[2F/tp, H] is the [2, F/tp, H] shard). `canonical_parameters()` exposes views with the canonical
names/shapes of DESIGN.md (`input_layernorm.weight` = TE's `linear_qkv.layer_norm_weight`), so the
seeded init, `load_global_state_dict`, checkpoints and HF conversion are those of the local path.
RoPE is applied by us (HF convention) before TE's attention, like the local path. Inside the
layer TE runs in [S, B, H] (its sequence-parallel collectives use dim 0); the layer takes and
returns our [B, S, H].

Amax reduction group for FP8 (`fp8_context`): training passes reduce over the TP x DP ranks of
the pipeline stage (`ProcessGrid.amax_group`, Megatron's amax reduction group: every rank holding
a shard or a replica of the weights shares one scale); no-grad passes run outside fp8_autocast
(bf16) unless `cfg.fp8_no_grad` (then reduced over TP only: DP ranks may run different numbers of
them), and never inside `fp8.fp8_suspended()` (the sampler). The scaling state lives in each TE
module's `_extra_state`; checkpoints carry it (model/fp8.py `fp8_state_entries`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..parallel.state import group_size
from .config import TransformerConfig
from .fp8 import fp8_runs_now

_FIX = ("install NVIDIA Transformer Engine on a CUDA machine (pip install --no-build-isolation "
        "transformer_engine[pytorch]) or use --transformer-impl local")


def import_te():
    """Import transformer_engine.pytorch or raise an error that names the fix."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"transformer_impl='transformer_engine' needs a CUDA GPU, none is visible: {_FIX}")
    try:
        import transformer_engine.pytorch as te  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing CUDA libraries)
        raise RuntimeError(f"transformer_impl='transformer_engine' but Transformer Engine cannot be "
                           f"imported ({type(e).__name__}: {e}): {_FIX}") from e
    return te


def import_te_recipe():
    """transformer_engine.common.recipe (a function, so that CPU tests can put a stand-in here)."""
    import_te()
    from transformer_engine.common import recipe
    return recipe


def fp8_recipe(cfg: TransformerConfig):
    recipe = import_te_recipe()
    fmt = {"hybrid": recipe.Format.HYBRID, "e4m3": recipe.Format.E4M3}[cfg.fp8_format]
    return recipe.DelayedScaling(fp8_format=fmt, margin=cfg.fp8_margin,
                                 amax_history_len=cfg.fp8_amax_history_len, amax_compute_algo="max")


def amax_reduction_group(grid_or_group, training: bool):
    """The fp8_group of a pass: a ProcessGrid gives its TP x DP `amax_group` for training passes and
    its TP group for no-grad ones; a process group (or None) is used as given."""
    if hasattr(grid_or_group, "amax_group"):
        return grid_or_group.amax_group if training else grid_or_group.tp_group
    return grid_or_group


def fp8_context(cfg: TransformerConfig, grid_or_group=None):
    """`fp8_autocast` around the decoder layers when `cfg.fp8_format` is set and this pass runs FP8
    (training passes; no-grad ones only with `cfg.fp8_no_grad`; none inside `fp8_suspended()`),
    else a no-op: the layers then run in the compute dtype. `grid_or_group`: the model's
    ProcessGrid (amax over TP x DP for training passes, see `amax_reduction_group`) or a group.
    The local implementation's FP8 (model/fp8.py) needs no context: a no-op for it too."""
    if cfg.fp8_format is None or cfg.transformer_impl != "transformer_engine" or not fp8_runs_now(cfg.fp8_no_grad):
        return contextlib.nullcontext()
    te = import_te()
    autocast = getattr(te, "fp8_autocast")
    group = amax_reduction_group(grid_or_group, training=torch.is_grad_enabled())
    return autocast(enabled=True, fp8_recipe=fp8_recipe(cfg), fp8_group=group)


def te_checkpoint(layer, *args):
    """Activation recompute of a TE layer with TE's checkpoint (FP8-aware: the recompute runs under
    the same fp8_autocast state and amax/scale bookkeeping as the forward)."""
    te = import_te()
    return te.checkpoint(layer, *args, use_reentrant=False)


def _mark(p: torch.Tensor, sequence_parallel: bool = False) -> None:
    p.sequence_parallel = sequence_parallel


def te_layer_class():
    """The TE layer class (imports TE; raises the clear error when unavailable)."""
    te = import_te()

    class TETransformerLayer(nn.Module):
        def __init__(self, cfg: TransformerConfig, tp_group, sequence_parallel: bool, device=None):
            super().__init__()
            tp = group_size(tp_group)
            q, g, d, h, f = (cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                             cfg.ffn_hidden_size)
            self.cfg, self.tp = cfg, tp
            self.per_group, self.local_groups, self.local_heads, self.head_dim = q // g, g // tp, q // tp, d
            common = dict(tp_group=tp_group, tp_size=tp, sequence_parallel=sequence_parallel,
                          params_dtype=cfg.params_dtype, device=device or "cuda")
            self.self_attention = nn.Module()
            self.self_attention.linear_qkv = te.LayerNormLinear(
                h, (q + 2 * g) * d, eps=cfg.norm_epsilon, bias=cfg.add_qkv_bias, normalization="RMSNorm",
                parallel_mode="column", **common)
            self.self_attention.core_attention = te.DotProductAttention(
                q, d, num_gqa_groups=g, attention_dropout=cfg.attention_dropout, qkv_format="sbhd",
                attn_mask_type="no_mask", tp_size=tp, tp_group=tp_group)
            self.self_attention.linear_proj = te.Linear(q * d, h, bias=False, parallel_mode="row", **common)
            self.mlp = nn.Module()
            self.mlp.linear_fc1 = te.LayerNormLinear(h, 2 * f, eps=cfg.norm_epsilon, bias=False,
                                                     normalization="RMSNorm", parallel_mode="column", **common)
            self.mlp.linear_fc2 = te.Linear(f, h, bias=False, parallel_mode="row", **common)
            for ln in (self.self_attention.linear_qkv, self.mlp.linear_fc1):
                _mark(ln.layer_norm_weight, sequence_parallel)

        def canonical_parameters(self) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
            sa, mlp = self.self_attention, self.mlp
            r, d, h = self.per_group, self.head_dim, self.cfg.hidden_size
            out = {
                "input_layernorm.weight": (sa.linear_qkv.layer_norm_weight, None),
                "self_attention.linear_qkv.weight": (sa.linear_qkv.weight.view(self.local_groups, (r + 2) * d, h), 0),
                "self_attention.linear_proj.weight": (sa.linear_proj.weight, 1),
                "pre_mlp_layernorm.weight": (mlp.linear_fc1.layer_norm_weight, None),
                "mlp.linear_fc1.weight": (mlp.linear_fc1.weight.view(2, -1, h), 1),
                "mlp.linear_fc2.weight": (mlp.linear_fc2.weight, 1),
            }
            if self.cfg.add_qkv_bias:
                out["self_attention.linear_qkv.bias"] = (sa.linear_qkv.bias.view(self.local_groups, (r + 2) * d), 0)
            return out

        def forward(self, x, mask, cos, sin, prefix_kv=None):
            """x [B, S(/tp), H] -> same; runs TE in [S, B, H] because TE's sequence-parallel
            collectives act on dim 0 (our sequence shards become contiguous dim-0 shards)."""
            from .attention import te_attention
            from .transformer import apply_rotary
            sa = self.self_attention
            xs = x.transpose(0, 1).contiguous()
            cos, sin = cos.transpose(0, 1), sin.transpose(0, 1)  # [S, B, 1, D]
            qkv = sa.linear_qkv(xs)
            s, b = qkv.shape[:2]
            r, d = self.per_group, self.head_dim
            qkv = qkv.view(s, b, self.local_groups, r + 2, d)
            q = apply_rotary(qkv[:, :, :, :r].reshape(s, b, self.local_heads, d), cos, sin)
            k = apply_rotary(qkv[:, :, :, r], cos, sin)
            v = qkv[:, :, :, r + 1]
            own_kv = (k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))  # [B, kv/tp, S, D] like the local path
            if prefix_kv is not None:
                k = torch.cat([prefix_kv[0].permute(2, 0, 1, 3).to(k.dtype), k], dim=0)
                v = torch.cat([prefix_kv[1].permute(2, 0, 1, 3).to(v.dtype), v], dim=0)
            selective = self.cfg.recompute_granularity == "selective" and self.training
            # mask -> TE's "no_mask" / "padding" (fused, flash) / "arbitrary" (unfused): attention.py
            out = te_attention(sa.core_attention, q.contiguous(), k.contiguous(), v.contiguous(), mask,
                               checkpoint_core_attention=selective)
            out = sa.linear_proj(out.reshape(s, b, self.local_heads * d))
            p = self.cfg.hidden_dropout if self.training else 0.0
            xs = xs + torch.nn.functional.dropout(out, p, self.training)
            gate, up = self.mlp.linear_fc1(xs).chunk(2, dim=-1)
            y = self.mlp.linear_fc2(torch.nn.functional.silu(gate) * up)
            xs = xs + torch.nn.functional.dropout(y, p, self.training)
            return xs.transpose(0, 1).contiguous(), own_kv

    return TETransformerLayer
