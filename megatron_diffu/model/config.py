"""`TransformerConfig`: the shape and numerics of the diffusion transformer, plus named presets.

Field names are Megatron-LM argument names with underscores (`num_query_groups`,
`ffn_hidden_size`, ...) so that the composite run config derives `--num-query-groups` etc.
All fields are plain YAML-serialisable values (no torch dtypes); `params_dtype` is a property.

Parallel-layout settings (TP/PP sizes, `sequence_parallel`) are NOT fields here: they belong to
the parallel section of the run config and reach the model through `ProcessGrid` and the
`DiffusionTransformer(..., sequence_parallel=...)` argument. `validate(tp_size, pp_size)`
checks that this shape can be split that way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_diffu.config import SectionConfig

TRANSFORMER_IMPLS = ("local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "sdpa", "te")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
FP8_FORMATS = (None, "hybrid", "e4m3")


@dataclass
class TransformerConfig(SectionConfig):
    """Qwen2.5-style bidirectional transformer (Dream / DiffuCoder architecture)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # KV heads (GQA); None = num_attention_heads (MHA)
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 256  # padded vocabulary size (rows of the embedding)
    max_position_embeddings: int = 4096
    rotary_base: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = True
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bf16: bool = False  # parameters and compute in bfloat16 (fp32 master weights live in the optimizer)
    logit_shift: bool = True  # logits at i-1 predict token i (AR-init convention, docs/ALGORITHMS.md sec. 1)
    transformer_impl: str = "local"
    attention_backend: str = "auto"
    recompute_granularity: Optional[str] = None
    recompute_num_layers: Optional[int] = None  # full recompute: first N layers of each stage (None = all)
    fp8_format: Optional[str] = None
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    # no-grad passes (evaluation, GRPO old/reference log-probs) in FP8 too; default bf16, as they
    # update no weight and the scales they would record are not the training passes' (sampler: bf16 always)
    fp8_no_grad: bool = False
    seed: int = 1234

    # ------------------------------------------------------------------ derived values
    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TransformerConfig":
        """A named preset with field overrides; validated (for TP=PP=1) before it is returned."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"TransformerConfig has no field(s) {unknown}; valid fields: {sorted(known)}")
        cfg = cls(**{**PRESETS[name], **overrides})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def problems(self, tp_size: int = 1, pp_size: int = 1) -> list[str]:
        """Every shape/option problem, and whether the model splits over TP x PP (naming the fix)."""
        return self._shape_errors() + self._option_errors() + self._split_errors(tp_size, pp_size)

    def _shape_errors(self) -> list[str]:
        e = []
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                e.append(f"{name}={getattr(self, name)} must be >= 1")
        if e:
            return e
        q, g = self.num_attention_heads, self.num_kv_heads
        if g < 1 or q % g:
            e.append(f"num_attention_heads={q} is not divisible by num_query_groups={g}: "
                     f"choose num_query_groups among the divisors of {q}")
        if self.kv_channels is None and self.hidden_size % q:
            e.append(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={q}: "
                     f"change one of them or set kv_channels explicitly")
        if self.head_dim % 2:
            e.append(f"head dim {self.head_dim} must be even for rotary embeddings (kv_channels)")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                e.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.norm_epsilon <= 0 or self.rotary_base <= 0 or self.init_method_std <= 0:
            e.append("norm_epsilon, rotary_base and init_method_std must be > 0")
        return e

    def _option_errors(self) -> list[str]:
        e = []
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            e.append(f"transformer_impl={self.transformer_impl!r}: choose one of {TRANSFORMER_IMPLS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            e.append(f"attention_backend={self.attention_backend!r}: choose one of {ATTENTION_BACKENDS}")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            e.append(f"recompute_granularity={self.recompute_granularity!r}: choose one of {RECOMPUTE_GRANULARITIES}")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 0:
            e.append(f"recompute_num_layers={self.recompute_num_layers} must be >= 0")
        if self.fp8_format not in FP8_FORMATS:
            e.append(f"fp8_format={self.fp8_format!r}: choose one of {FP8_FORMATS}")
        # fp8_format with transformer_impl='local': the torch-native FP8 linears (model/fp8.py,
        # torch._scaled_mm on Hopper-class GPUs; emulated in fp32 on CPU)
        return e

    def _split_errors(self, tp: int, pp: int) -> list[str]:
        e = []
        if tp < 1 or pp < 1:
            return [f"tensor/pipeline parallel sizes must be >= 1 (got tp={tp}, pp={pp})"]
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.num_kv_heads),
                            ("ffn_hidden_size", self.ffn_hidden_size),
                            ("vocab_size", self.vocab_size)):
            if value % tp:
                e.append(f"{name}={value} is not divisible by tensor_model_parallel_size={tp}: "
                         f"pick a TP size that divides it" + (" (or pad the vocabulary: "
                         "make_vocab_size_divisible_by)" if name == "vocab_size" else ""))
        if pp > self.num_layers:
            e.append(f"pipeline_model_parallel_size={pp} exceeds num_layers={self.num_layers}")
        if not e:  # FP8 GEMM dims per TP rank (the lengths are the stages' to check: fp8_shapes.py)
            from megatron_diffu.model.fp8_shapes import feature_problems
            e.extend(feature_problems(self, tp))
        return e

    # ------------------------------------------------------------------ counting
    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the global model (all TP/PP shards together)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, g = self.num_attention_heads, self.num_kv_heads
        qkv = (q + 2 * g) * d * h + ((q + 2 * g) * d if self.add_qkv_bias else 0)
        layer = qkv + q * d * h + 3 * f * h + 2 * h
        n = self.num_layers * layer + h
        if include_embeddings:
            n += self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        return n

    def flops_per_token(self, seq_length: int, training: bool = True) -> float:
        """Matmul FLOPs per token (forward, or forward+backward = 3x when `training`).

        Counts 2 FLOPs per multiply-add for every linear (QKV, proj, MLP, output layer) and the
        bidirectional attention scores/values (2 * 2 * S * Q * D per token per layer: the full
        S x S matrix, no causal halving since attention is bidirectional).
        """
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, g = self.num_attention_heads, self.num_kv_heads
        linear = (q + 2 * g) * d * h + q * d * h + 3 * f * h
        attn = 2 * seq_length * q * d
        per_layer = 2 * (linear + attn)
        fwd = self.num_layers * per_layer + 2 * self.vocab_size * h
        return float(fwd * (3 if training else 1))

    def head_flops_per_row(self) -> float:
        """Forward matmul FLOPs of the output layer for one logit row (2 * V * H)."""
        return 2.0 * self.vocab_size * self.hidden_size

    def body_flops_per_token(self, seq_length: int) -> float:
        """Forward matmul FLOPs of everything but the output layer, per token of a length-S sequence."""
        return self.flops_per_token(seq_length, training=False) - self.head_flops_per_row()

    def step_flops(self, body_tokens: float, head_rows: float, seq_length: int, passes: float = 3.0) -> float:
        """Matmul FLOPs of `body_tokens` tokens through the layers (sequences of `seq_length`) and
        `head_rows` logit rows through the output layer, times `passes` (3 = forward + backward,
        1 = forward only). The one FLOP count every stage's MFU uses (docs/ALGORITHMS.md sec. 8):
        the diffusion head computes logits only at the rows a loss or a sampler needs."""
        return passes * (self.body_flops_per_token(seq_length) * body_tokens + self.head_flops_per_row() * head_rows)


PRESETS: dict[str, dict[str, Any]] = {  # also TransformerConfig.PRESETS (`--model-preset NAME`)
    # unit tests: everything small but every feature exercised (GQA, qkv bias, untied head)
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=256, max_position_embeddings=1024),
    # ~100M parameters (tied 32k vocabulary) for CPU/GPU benchmarks
    "small-100m": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                       num_query_groups=4, vocab_size=32000, max_position_embeddings=4096,
                       untie_embeddings_and_output_weights=False),
    "qwen2.5-0.5b": dict(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
                         num_query_groups=2, vocab_size=151936, max_position_embeddings=32768,
                         untie_embeddings_and_output_weights=False),
    "qwen2.5-1.5b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                         num_query_groups=2, vocab_size=151936, max_position_embeddings=32768,
                         untie_embeddings_and_output_weights=False),
    # Qwen2.5-Coder-7B shape (DiffuCoder-7B / Dream-7B)
    "diffucoder-7b": dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                          num_query_groups=4, vocab_size=152064, max_position_embeddings=32768,
                          untie_embeddings_and_output_weights=True, bf16=True),
}

TransformerConfig.PRESETS = PRESETS
