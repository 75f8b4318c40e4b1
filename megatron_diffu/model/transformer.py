"""`DiffusionTransformer`: the Qwen2.5 decoder with bidirectional attention (Dream / DiffuCoder).

Layout decisions (see docs/DESIGN.md for the interface):
- Activations are ``[B, S, H]`` (batch first) everywhere, including between pipeline stages.
  Under sequence parallelism the sequence dim (1) is split over the TP ranks between the blocks
  (norms and residual adds run on ``[B, S/tp, H]``); a pipeline stage then sends ``[B, S/tp, H]``
  (`stage_output_shape`). Attention always sees the full sequence.
- Parameters have the canonical TP-sharded shapes of DESIGN.md (fused QKV ``[G, (Q/G+2)*D, H]``,
  fc1 ``[2, F, H]``); forward takes 2-D views. Module names are the global names (layers are kept
  in a ModuleDict keyed by the *global* layer number), so ``named_parameters()`` already yields the
  checkpoint names.
- Weights: every parameter's global tensor is drawn from a generator seeded by
  ``(cfg.seed, name)`` and then sliced, so every TP/PP layout holds the same global model.
- Masks (model/attention.py): a [B, S] padding mask stays a [B, 1, 1, S] key-padding mask (real
  rows see exactly the real keys; padded query rows see them too, their outputs are meaningless
  but finite and nothing reads them); 4-D masks are used as given, a row with no key gets its own
  key (a fully masked row would give NaN in SDPA). The SDPA call is arranged to stay on a fused
  kernel when masked (`attention`, `attention_plan`).
- Dropout uses the global torch RNG; a trainer that uses dropout with TP > 1 must seed the TP
  ranks' RNG identically (hidden dropout acts on TP-replicated activations).
- Tied embeddings with PP > 1: the last stage holds its own copy of
  ``embedding.word_embeddings.weight`` (same global init); `allreduce_embedding_grads` keeps the
  two copies' gradients summed (call it after backward, like Megatron's embedding group).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..common.seeding import parameter_seed
from ..parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                               copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                               linear_accumulating)
from ..parallel.state import ProcessGrid, group_rank, group_size
from .attention import AttentionMask, attention, build_attention_mask  # noqa: F401 (re-exported)
from .config import TransformerConfig
from .fp8 import recompute_contexts

KV = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------- small pieces
class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale (same op order as HF)."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))
        self.weight.tp_shard_dim = None
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin [B, S, 1, D] for RoPE in the HF Qwen2 convention (fp32 math, cast to `dtype`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                            device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D]."""
    return x * cos + _rotate_half(x) * sin


def default_position_ids(attention_mask: Optional[torch.Tensor], batch: int, q_len: int,
                         prefix_len: int, device) -> torch.Tensor:
    """cumsum(padding) - 1 clamped at 0 for [B, Sk] padding masks (skips left padding), else arange."""
    if attention_mask is not None and attention_mask.dim() == 2:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[:, -q_len:]
    return torch.arange(prefix_len, prefix_len + q_len, device=device).unsqueeze(0).expand(batch, q_len)


def pipeline_layer_split(cfg: TransformerConfig, pp_size: int, pp_rank: int,
                         split: Optional[Sequence[int]] = None) -> list[int]:
    """Global layer ids of stage `pp_rank`. `split` = layers per stage (explicit list), else an
    even split where the first `num_layers % pp_size` stages take one extra layer."""
    n = cfg.num_layers
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} out of range for pipeline_model_parallel_size {pp_size}")
    if split is None:
        if pp_size > n:
            raise ValueError(f"pipeline_model_parallel_size={pp_size} exceeds num_layers={n}")
        base, extra = divmod(n, pp_size)
        split = [base + (1 if r < extra else 0) for r in range(pp_size)]
    split = [int(s) for s in split]
    if len(split) != pp_size or sum(split) != n or min(split) < 1:
        raise ValueError(f"pipeline layer split {split} must have {pp_size} entries >= 1 summing to "
                         f"num_layers={n}")
    start = sum(split[:pp_rank])
    return list(range(start, start + split[pp_rank]))


# ---------------------------------------------------------------------- blocks
class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp_group, sequence_parallel: bool, device=None):
        super().__init__()
        tp = group_size(tp_group)
        self.cfg, self.tp_group = cfg, tp_group
        q, g, d, h = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.per_group = q // g
        self.local_groups, self.local_heads, self.head_dim = g // tp, q // tp, d
        self.linear_qkv = ColumnParallelLinear(
            h, (q + 2 * g) * d, tp_group=tp_group, bias=cfg.add_qkv_bias, sequence_parallel=sequence_parallel,
            weight_shape=(g, (self.per_group + 2) * d, h), shard_dim=0, dtype=cfg.params_dtype, device=device)
        self.linear_proj = RowParallelLinear(q * d, h, tp_group=tp_group, sequence_parallel=sequence_parallel,
                                             dtype=cfg.params_dtype, device=device)

    def _core(self, q, k, v, mask: Optional[AttentionMask]):
        return attention(q, k, v, mask, dropout_p=self.cfg.attention_dropout if self.training else 0.0)

    def forward(self, x, mask, cos, sin, prefix_kv: Optional[KV] = None):
        qkv = self.linear_qkv(x)
        b, s = qkv.shape[:2]
        r, d = self.per_group, self.head_dim
        qkv = qkv.view(b, s, self.local_groups, r + 2, d)
        q = apply_rotary(qkv[:, :, :, :r].reshape(b, s, self.local_heads, d), cos, sin)
        k = apply_rotary(qkv[:, :, :, r], cos, sin)
        v = qkv[:, :, :, r + 1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
        own_kv = (k, v)
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        if self.cfg.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, mask, use_reentrant=False)
        else:
            out = self._core(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, s, self.local_heads * d)
        return self.linear_proj(out), own_kv


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp_group, sequence_parallel: bool, device=None):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(h, 2 * f, tp_group=tp_group, sequence_parallel=sequence_parallel,
                                               weight_shape=(2, f, h), shard_dim=1,
                                               dtype=cfg.params_dtype, device=device)
        self.linear_fc2 = RowParallelLinear(f, h, tp_group=tp_group, sequence_parallel=sequence_parallel,
                                            dtype=cfg.params_dtype, device=device)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, tp_group, sequence_parallel: bool, device=None):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, cfg.params_dtype, device)
        self.self_attention = SelfAttention(cfg, tp_group, sequence_parallel, device)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, cfg.params_dtype, device)
        self.mlp = MLP(cfg, tp_group, sequence_parallel, device)
        for norm in (self.input_layernorm, self.pre_mlp_layernorm):
            norm.weight.sequence_parallel = sequence_parallel

    def forward(self, x, mask, cos, sin, prefix_kv: Optional[KV] = None):
        p = self.cfg.hidden_dropout if self.training else 0.0
        attn, kv = self.self_attention(self.input_layernorm(x), mask, cos, sin, prefix_kv)
        x = x + F.dropout(attn, p, self.training)
        x = x + F.dropout(self.mlp(self.pre_mlp_layernorm(x)), p, self.training)
        return x, kv


# ---------------------------------------------------------------------- the model
class DiffusionTransformer(nn.Module):
    """The model of DESIGN.md (Model); see the module docstring for layout decisions.

    Args beyond DESIGN.md: `sequence_parallel` (split the sequence over TP between blocks; the
    parallel section of the run config owns the flag, hence an argument and not a config field;
    ignored at TP=1), `device` (where parameters are allocated), `init_weights=False` (skip the
    seeded init when a checkpoint will be loaded anyway).
    forward(...) also accepts `hidden_states=` (stages built with pre_process=False).
    """

    def __init__(self, cfg: TransformerConfig, grid: Optional[ProcessGrid] = None, pre_process: bool = True,
                 post_process: bool = True, layer_ids: Optional[Sequence[int]] = None,
                 sequence_parallel: bool = False, device=None, init_weights: bool = True):
        super().__init__()
        self.grid = grid or ProcessGrid.single()
        self.tp_group = self.grid.tp_group
        self.tp_size, self.tp_rank = group_size(self.tp_group), group_rank(self.tp_group)
        cfg.validate(tp_size=self.tp_size, pp_size=self.grid.pp_size)
        self.cfg, self.pre_process, self.post_process = cfg, pre_process, post_process
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1
        self.layer_ids = list(range(cfg.num_layers) if layer_ids is None else layer_ids)
        dtype, tp, sp = cfg.params_dtype, self.tp_group, self.sequence_parallel
        layer_cls = TransformerLayer
        if cfg.transformer_impl == "transformer_engine":
            from .te_backend import te_layer_class
            layer_cls = te_layer_class()
        tied = not cfg.untie_embeddings_and_output_weights
        if pre_process or (post_process and tied):
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, tp_group=tp, sequence_parallel=sp, dtype=dtype, device=device)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleDict({str(i): layer_cls(cfg, tp, sp, device) for i in self.layer_ids})
        if post_process:
            self.decoder.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, device)
            self.decoder.final_layernorm.weight.sequence_parallel = sp
            if not tied:
                self.output_layer = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, tp_group=tp,
                                                         dtype=dtype, device=device)
        if init_weights:
            self.reset_parameters()

    # ------------------------------------------------------------------ weights
    def _init_std(self, name: str) -> Optional[float]:
        """None = ones (norms) / zeros (biases); output-side projections scaled as Megatron."""
        if name.endswith("layernorm.weight") or name.endswith(".bias"):
            return None
        if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
            return self.cfg.init_method_std / math.sqrt(2.0 * self.cfg.num_layers)
        return self.cfg.init_method_std

    def canonical_parameters(self) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
        """{global name: (local tensor in the canonical local shape, TP shard dim or None)}.

        For the local implementation these are the parameters themselves; the Transformer Engine
        layers keep TE's own 2-D parameters and report canonical *views* (same storage), so
        init, loading and checkpoints are identical for both implementations.
        """
        out: dict[str, tuple[torch.Tensor, Optional[int]]] = {}
        for name, module in self.named_children():
            if name == "decoder":
                continue
            for n, p in module.named_parameters(prefix=name):
                out[n] = (p, getattr(p, "tp_shard_dim", None))
        for lid, layer in self.decoder.layers.items():
            prefix = f"decoder.layers.{lid}."
            if hasattr(layer, "canonical_parameters"):
                items = layer.canonical_parameters().items()
            else:
                items = ((n, (p, getattr(p, "tp_shard_dim", None))) for n, p in layer.named_parameters())
            for n, (t, d) in items:
                out[prefix + n] = (t, d)
        if self.post_process:
            w = self.decoder.final_layernorm.weight
            out["decoder.final_layernorm.weight"] = (w, None)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every global tensor from a generator keyed by (seed, name), keep our slice."""
        for name, (t, dim) in self.canonical_parameters().items():
            shape = self._global_shape(t, dim)
            std = self._init_std(name)
            if std is None:
                full = torch.ones(shape) if name.endswith("layernorm.weight") else torch.zeros(shape)
            else:
                gen = torch.Generator().manual_seed(parameter_seed(self.cfg.seed, name))
                full = torch.empty(shape).normal_(0.0, std, generator=gen)
            t.copy_(self._local_slice(full, dim))

    def _local_slice(self, full: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
        return full if dim is None or self.tp_size == 1 else full.chunk(self.tp_size, dim=dim)[self.tp_rank]

    def _global_shape(self, t: torch.Tensor, dim: Optional[int]) -> tuple[int, ...]:
        shape = list(t.shape)
        if dim is not None:
            shape[dim] *= self.tp_size
        return tuple(shape)

    def sharded_state_dict(self) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
        """{global_name: (local tensor sharing the parameter's storage, TP shard dim or None)}."""
        return {n: (t.detach(), d) for n, (t, d) in self.canonical_parameters().items()}

    @torch.no_grad()
    def load_global_state_dict(self, full_tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy global (unsharded) tensors into the local shards. Keys of other pipeline stages
        are ignored; with `strict`, a missing local key, an unknown key or a wrong shape raises."""
        params = self.canonical_parameters()
        missing = [n for n in params if n not in full_tensors]
        unknown = [k for k in full_tensors if k not in params and not _is_model_key(k, self.cfg)]
        if strict and (missing or unknown):
            raise KeyError(f"load_global_state_dict: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''}")
        for name, (t, dim) in params.items():
            if name not in full_tensors:
                continue
            full = full_tensors[name]
            if tuple(full.shape) != self._global_shape(t, dim):
                raise ValueError(f"{name}: checkpoint shape {tuple(full.shape)} != model shape "
                                 f"{self._global_shape(t, dim)} (check the model config)")
            t.copy_(self._local_slice(full, dim).to(device=t.device, dtype=t.dtype))

    # ------------------------------------------------------------------ forward
    def stage_output_shape(self, micro_batch_size: int, seq_length: int) -> tuple[int, int, int]:
        """Shape of the hidden states this stage sends to the next one ([B, S(/tp), H])."""
        s = seq_length // self.tp_size if self.sequence_parallel else seq_length
        return (micro_batch_size, s, self.cfg.hidden_size)

    def _layer_context(self):
        """FP8 autocast around the decoder layers (TE backend with fp8_format), else a no-op."""
        if self.cfg.fp8_format is None:
            return contextlib.nullcontext()
        from .te_backend import fp8_context
        return fp8_context(self.cfg, self.grid)  # amax over TP x DP (Megatron)

    def _use_full_recompute(self, index: int) -> bool:
        if self.cfg.recompute_granularity != "full" or not self.training or not torch.is_grad_enabled():
            return False
        n = self.cfg.recompute_num_layers
        return n is None or index < n

    def _recompute(self, layer, *args):
        """Full recompute of one layer: Transformer Engine layers go through TE's checkpoint, which
        replays the forward inside the FP8 context and its scaling state (torch's would recompute
        outside fp8_autocast); the local layers through torch.utils.checkpoint, whose recomputation
        reuses the forward's native FP8 scales (`fp8.recompute_contexts`)."""
        if self.cfg.transformer_impl == "transformer_engine":
            from .te_backend import te_checkpoint
            return te_checkpoint(layer, *args)
        return checkpoint(layer, *args, use_reentrant=False, context_fn=recompute_contexts)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, logit_positions: Optional[torch.Tensor] = None,
                prefix_kv: Optional[Sequence[KV]] = None, return_kv: bool = False,
                hidden_states: Optional[torch.Tensor] = None):
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            b, s = input_ids.shape
            x = self.embedding.word_embeddings(input_ids)
            device = input_ids.device
        else:
            if hidden_states is None:
                raise ValueError("a pipeline stage built with pre_process=False needs hidden_states=")
            b, s = hidden_states.shape[0], hidden_states.shape[1] * (self.tp_size if self.sequence_parallel else 1)
            x, device = hidden_states, hidden_states.device
        if prefix_kv is not None and len(prefix_kv) != len(self.layer_ids):
            raise ValueError(f"prefix_kv has {len(prefix_kv)} entries, this stage has {len(self.layer_ids)} layers")
        prefix_len = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
        mask = build_attention_mask(attention_mask, b, s, prefix_len)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, s, prefix_len, device)
        cos, sin = rotary_cos_sin(position_ids.expand(b, s), self.cfg.head_dim, self.cfg.rotary_base, x.dtype)
        kvs = []
        with self._layer_context():
            for index, layer in enumerate(self.decoder.layers.values()):
                pkv = prefix_kv[index] if prefix_kv is not None else None
                if self._use_full_recompute(index):
                    x, kv = self._recompute(layer, x, mask, cos, sin, pkv)
                else:
                    x, kv = layer(x, mask, cos, sin, pkv)
                kvs.append(kv)
        out = self._head(x, logit_positions) if self.post_process else x
        return (out, kvs) if return_kv else out

    def _head(self, x: torch.Tensor, logit_positions: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.decoder.final_layernorm(x)
        # the output layer is column-parallel over the vocabulary: its input gradient is a partial
        # sum on each TP rank (all-reduce, or reduce-scatter back to sequence shards under SP)
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        else:
            x = copy_to_tensor_parallel_region(x, self.tp_group)
        shift = self.cfg.logit_shift
        if logit_positions is not None:
            if tuple(logit_positions.shape) != tuple(x.shape[:2]):
                raise ValueError(f"logit_positions has shape {tuple(logit_positions.shape)}, "
                                 f"expected {tuple(x.shape[:2])}")
            rows, cols = logit_positions.nonzero(as_tuple=True)
            x = x[rows, (cols - 1).clamp(min=0) if shift else cols]  # [N, H]
            return _rows_padded_linear(x, self._output_parameter)
        elif shift:
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        return linear_accumulating(x, self._output_parameter)

    @property
    def _output_parameter(self) -> nn.Parameter:
        """The head's parameter itself (its optimizer attributes live on it, not on a view)."""
        if self.cfg.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    @property
    def output_weight(self) -> torch.Tensor:
        w = self._output_parameter
        return w.reshape(-1, w.shape[-1])


HEAD_ROW_MULTIPLE = 64


def _rows_padded_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear over [N, H] rows with N padded by zero rows to a multiple of HEAD_ROW_MULTIPLE, then cut
    back to N. The number of masked positions changes every step; a GEMM of a new shape builds a new
    kernel plan (oneDNN caches up to 1024 of them for bf16 on CPU, ~5 MB each: RSS grew ~5 MB/step;
    cuBLAS/TE choose per shape too) and FP8 GEMMs want N % 16. At most 63 extra rows, whose logits
    are zero, carry no gradient and are never returned (a real row's logit may be summed in another
    order by the other GEMM shape: fp32 rounding, as any change of batch)."""
    n = x.shape[0]
    pad = (-n) % HEAD_ROW_MULTIPLE
    if pad == 0:
        return linear_accumulating(x, weight)
    return linear_accumulating(torch.cat([x, x.new_zeros(pad, x.shape[1])]), weight)[:n]


def _is_model_key(key: str, cfg: TransformerConfig) -> bool:
    """True if `key` names a parameter of the full model (maybe of another pipeline stage)."""
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
    if m:
        return int(m.group(1)) < cfg.num_layers
    return key in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")


def global_parameter_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Canonical global name -> shape of the full model (DESIGN.md), for converters/checkpoints."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, g = cfg.num_attention_heads, cfg.num_kv_heads
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = (g, (q // g + 2) * d, h)
        if cfg.add_qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (g, (q // g + 2) * d)
        shapes[p + "self_attention.linear_proj.weight"] = (h, q * d)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.linear_fc1.weight"] = (2, f, h)
        shapes[p + "mlp.linear_fc2.weight"] = (h, f)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (cfg.vocab_size, h)
    return shapes


def allreduce_embedding_grads(model: DiffusionTransformer, grid: ProcessGrid) -> None:
    """Tied embeddings with PP > 1: sum the word-embedding gradient of the first and last stage."""
    if grid.pp_size == 1 or model.cfg.untie_embeddings_and_output_weights:
        return
    if not (grid.is_first_stage or grid.is_last_stage) or grid.embedding_group is None:
        return
    import torch.distributed as dist
    w = model.embedding.word_embeddings.weight
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=grid.embedding_group)
