"""A CPU stand-in for `transformer_engine.pytorch`: the three modules te_backend.py uses, with TE's
parameter NAMES, SHAPES and ATTRIBUTES (transformer_engine/pytorch/module/{linear,layernorm_linear}.py
`reset_parameters`: weights get `tensor_model_parallel=True`, `partition_dim` 0 (column) / 1 (row),
`partition_stride=1`; column biases the same with dim 0; row biases and norm weights
`sequence_parallel` only; never our `tp_shard_dim`) and TE's [S, B, H] tensor-parallel semantics
(sequence parallel on dim 0). The math is plain torch (RMSNorm as ours, SDPA), so a model built
with it equals the local model; what it tests is how the rest of the code treats TE's parameters.

FP8: `fp8_autocast` records each entry (`AUTOCAST_CALLS`: recipe and fp8_group) and sets the state
the linears read; every Linear records whether it ran under it (`fp8_calls`) and, under it, keeps
a TE-like delayed-scaling state (amax history of its input, scale = 448 / max) that it serialises
as TE does, a uint8 tensor from `get_extra_state` (empty before any FP8 pass), so nn.Module's
`state_dict` holds an `_extra_state` entry. `recipe` stands in for transformer_engine.common.recipe.

Use: `monkeypatch.setattr(te_backend, "import_te", lambda: fake_te)` (see `install`).
"""
from __future__ import annotations

import contextlib
import pickle
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
        self.fp8_calls: list[bool] = []  # per forward: ran under fp8_autocast
        self.fp8_meta = None
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_local, dtype=params_dtype))
            if parallel_mode == "column":
                _tp_attrs(self.bias, 0)
            else:
                self.bias.sequence_parallel = sequence_parallel

    def get_extra_state(self):  # TE: a pickled dict in a uint8 tensor, empty without FP8 metadata
        if self.fp8_meta is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(self.fp8_meta)), dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is not None and state.numel():
            self.fp8_meta = pickle.loads(state.numpy().tobytes())

    def _record_fp8(self, x):
        enabled = FP8_STATE["enabled"]
        self.fp8_calls.append(enabled)
        if not enabled:
            return
        meta = self.fp8_meta or {"amax_history": torch.zeros(4), "scale": torch.ones(())}
        hist = torch.cat([x.detach().abs().amax().float().reshape(1), meta["amax_history"][:-1]])
        self.fp8_meta = {"amax_history": hist, "scale": 448.0 / hist.max()}

    def _input(self, x):
        if self.parallel_mode == "column":
            if self.sequence_parallel:
                return gather_from_sequence_parallel_region(x, self.tp_group, seq_dim=0)
            return copy_to_tensor_parallel_region(x, self.tp_group)
        return x

    def forward(self, x):
        self._record_fp8(x)
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
            # self-attention "padding" in sbhd as TE's fused (cuDNN) backend reads it: ONE [B, 1, 1, S]
            # mask (True = padding) whose counts become the sequence lengths (get_cu_seqlens), i.e.
            # each row's first n tokens are the real ones whatever the mask's positions; output rows
            # past n are not written (NaN here, so a caller that reads them fails)
            assert torch.is_tensor(attention_mask) and tuple(attention_mask.shape) == (b, 1, 1, s) \
                and kb.shape[2] == s, "TE self-attention padding takes one [B, 1, 1, S] mask, Sq = Sk"
            n = (~attention_mask).reshape(b, s).sum(-1, keepdim=True)
            real = torch.arange(s) < n  # [B, S]
            mask = real[:, None, None, :] | ~real.any(-1)[:, None, None, None]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
        if attn_mask_type == "padding":
            out = out.masked_fill(~real[:, None, :, None], float("nan"))
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def checkpoint(fn, *args, **kwargs):  # te.distributed.checkpoint stand-in (records the call)
    CHECKPOINT_CALLS.append(fn)
    kwargs.setdefault("use_reentrant", True)  # TE's default
    return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)


FP8_STATE = {"enabled": False}
AUTOCAST_CALLS: list = []


@contextlib.contextmanager
def fp8_autocast(enabled=True, fp8_recipe=None, fp8_group=None, **_):  # records, sets what Linear reads
    AUTOCAST_CALLS.append(dict(enabled=enabled, recipe=fp8_recipe, group=fp8_group))
    before = FP8_STATE["enabled"]
    FP8_STATE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        FP8_STATE["enabled"] = before


recipe = types.SimpleNamespace(Format=types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3"),
                               DelayedScaling=lambda **kw: types.SimpleNamespace(**kw))
CHECKPOINT_CALLS: list = []
module = types.SimpleNamespace(Linear=Linear, LayerNormLinear=LayerNormLinear,
                               DotProductAttention=DotProductAttention, checkpoint=checkpoint,
                               fp8_autocast=fp8_autocast)


def install(monkeypatch=None):
    """Make te_backend use this stand-in (monkeypatch when given, else set for the process)."""
    from megatron_diffu.model import te_backend
    if monkeypatch is not None:
        monkeypatch.setattr(te_backend, "import_te", lambda: module)
        monkeypatch.setattr(te_backend, "import_te_recipe", lambda: recipe)
    else:
        te_backend.import_te = lambda: module
        te_backend.import_te_recipe = lambda: recipe
    return module
