"""A CPU stand-in for `transformer_engine.pytorch`: the three modules te_backend.py uses, with TE's
parameter NAMES, SHAPES and ATTRIBUTES (transformer_engine/pytorch/module/{linear,layernorm_linear}.py
`reset_parameters`: weights get `tensor_model_parallel=True`, `partition_dim` 0 (column) / 1 (row),
`partition_stride=1`; column biases the same with dim 0; row biases and norm weights
`sequence_parallel` only; never our `tp_shard_dim`) and TE's [S, B, H] tensor-parallel semantics
(sequence parallel on dim 0). The math is plain torch (RMSNorm as ours, SDPA), so a model built
with it equals the local model; what it tests is how the rest of the code treats TE's parameters.

Use: `monkeypatch.setattr(te_backend, "import_te", lambda: fake_te)` (see `install`).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from megatron_diffu.parallel.layers import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                            reduce_from_tensor_parallel_region,
                                            reduce_scatter_to_sequence_parallel_region)


def _tp_attrs(p: torch.Tensor, dim: int) -> None:  # TE's set_tensor_model_parallel_attributes
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, parallel_mode=None, tp_group=None, tp_size=1,
                 sequence_parallel=False, params_dtype=torch.float32, device=None, **_):
        super().__init__()
        self.parallel_mode, self.tp_group, self.sequence_parallel = parallel_mode, tp_group, sequence_parallel
        out_local = out_features // tp_size if parallel_mode == "column" else out_features
        in_local = in_features // tp_size if parallel_mode == "row" else in_features
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=params_dtype))
        nn.init.normal_(self.weight, std=0.02)
        _tp_attrs(self.weight, 1 if parallel_mode == "row" else 0)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_local, dtype=params_dtype))
            if parallel_mode == "column":
                _tp_attrs(self.bias, 0)
            else:
                self.bias.sequence_parallel = sequence_parallel

    def _input(self, x):
        if self.parallel_mode == "column":
            if self.sequence_parallel:
                return gather_from_sequence_parallel_region(x, self.tp_group, seq_dim=0)
            return copy_to_tensor_parallel_region(x, self.tp_group)
        return x

    def forward(self, x):
        x = self._input(x)
        if self.parallel_mode == "row":
            y = F.linear(x, self.weight)
            y = (reduce_scatter_to_sequence_parallel_region(y, self.tp_group, seq_dim=0) if self.sequence_parallel
                 else reduce_from_tensor_parallel_region(y, self.tp_group))
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, eps=1e-5, bias=True, normalization="LayerNorm",
                 sequence_parallel=False, params_dtype=torch.float32, **kw):
        assert normalization == "RMSNorm"
        super().__init__(in_features, out_features, bias=bias, sequence_parallel=sequence_parallel,
                         params_dtype=params_dtype, **kw)
        self.eps = eps
        # registered after weight here; TE registers it first (names, not order, matter)
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features, dtype=params_dtype))
        self.layer_norm_weight.sequence_parallel = sequence_parallel

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x = self.layer_norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return super().forward(x)


class DotProductAttention(nn.Module):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", tp_size=1, tp_group=None, **_):
        super().__init__()
        assert qkv_format == "sbhd"
        self.calls: list[dict] = []

    def forward(self, q, k, v, attn_mask_type="no_mask", attention_mask=None, checkpoint_core_attention=False,
                **kw):
        self.calls.append(dict(attn_mask_type=attn_mask_type, checkpoint=checkpoint_core_attention, **kw))
        s, b, h, d = q.shape
        qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, heads, S, D]
        mask = None
        if attn_mask_type == "arbitrary":
            mask = ~attention_mask  # TE: True = masked out
        elif attn_mask_type == "padding":
            q_pad, k_pad = attention_mask  # [B, 1, 1, S] True = padding (TE's convention)
            mask = ~(q_pad.reshape(b, 1, -1, 1) | k_pad.reshape(b, 1, 1, -1))
            mask = mask | torch.eye(s, kb.shape[2], dtype=torch.bool)  # padded rows attend to themselves
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def checkpoint(fn, *args, **kwargs):  # te.distributed.checkpoint stand-in (records the call)
    CHECKPOINT_CALLS.append(fn)
    kwargs.setdefault("use_reentrant", True)  # TE's default
    return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)


CHECKPOINT_CALLS: list = []
module = types.SimpleNamespace(Linear=Linear, LayerNormLinear=LayerNormLinear,
                               DotProductAttention=DotProductAttention, checkpoint=checkpoint)


def install(monkeypatch=None):
    """Make te_backend use this stand-in (monkeypatch when given, else set for the process)."""
    from megatron_diffu.model import te_backend
    if monkeypatch is not None:
        monkeypatch.setattr(te_backend, "import_te", lambda: module)
    else:
        te_backend.import_te = lambda: module
    return module
