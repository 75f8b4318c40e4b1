"""FP8 GEMM shape rules, checked when a run starts (ALGORITHMS.md sec. 11.3).

Each decoder linear is a GEMM of [tokens, in] by [out, in] on one TP rank. The rules:

- native (model/fp8.py, `torch._scaled_mm(a [M, K], b [K, N])` needs K % 16 and N % 16): the
  forward (K=in, N=out), dgrad (K=out, N=in) and wgrad (K=tokens, N=in) GEMMs make tokens, in and
  out all multiples of 16; under sequence parallelism the column-parallel linears gather the
  sequence first and the row-parallel ones reduce-scatter after, so `tokens` is the full
  micro-batch (rows x length).
- Transformer Engine (`assert_dim_for_fp8_exec` on the input [tokens, in] and the weight [out, in]:
  product of the leading dims % 8, last dim % 16): tokens % 8, in % 16, out % 8, where TE checks
  its LOCAL input, the sequence shard (rows x length / TP) under sequence parallelism.

The model sizes are checked by `TransformerConfig.problems` (`feature_problems`); the lengths by
each stage's run config (`length_problems`), and stages whose lengths depend on the data pad to
`length_multiple` (GRPO's prompt + completion, SFT's cut buckets).
"""
from __future__ import annotations

import math
from typing import Sequence

# transformer_impl -> (tokens, in_features, out_features) multiples
ALIGN = {"local": (16, 16, 16), "transformer_engine": (8, 16, 8)}


def _align(cfg) -> tuple[int, int, int]:
    return ALIGN.get(cfg.transformer_impl, ALIGN["local"])


def linear_features(cfg, tp: int) -> dict[str, tuple[int, int]]:
    """{linear: (in_features, out_features)} of one TP rank's shard of each decoder linear."""
    q, g, d, h, f = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.ffn_hidden_size
    return {"linear_qkv": (h, (q + 2 * g) * d // tp), "linear_proj": (q * d // tp, h),
            "linear_fc1": (h, 2 * f // tp), "linear_fc2": (f // tp, h)}


def feature_problems(cfg, tp: int = 1) -> list[str]:
    """The model sizes whose per-TP-rank GEMM dims break the FP8 rule (none without fp8_format)."""
    if cfg.fp8_format is None or tp < 1:
        return []
    _, a_in, a_out = _align(cfg)
    q, g, d, h, f = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.ffn_hidden_size
    # every (in, out) of linear_features, once each; fc1's out 2F/tp follows from fc2's in F/tp
    checks = [
        ("model.hidden_size", h, max(a_in, a_out), f"use a multiple of {max(a_in, a_out)}"),
        (f"model.ffn_hidden_size / TP = {f}/{tp}", f // tp, a_in, f"use ffn_hidden_size a multiple of {a_in * tp}"),
        (f"model.num_attention_heads * head_dim / TP = {q}*{d}/{tp}", q * d // tp, a_in,
         f"make num_attention_heads * kv_channels a multiple of {a_in * tp}"),
        (f"model (num_attention_heads + 2 * num_query_groups) * head_dim / TP = ({q}+2*{g})*{d}/{tp}",
         (q + 2 * g) * d // tp, a_out, f"make it a multiple of {a_out} (kv_channels a multiple of {a_out * tp})"),
    ]
    return [f"model.fp8_format={cfg.fp8_format!r} ({cfg.transformer_impl}): {what} = {v} is not a multiple of {m} "
            f"(FP8 GEMM dims per TP rank): {fix}, or drop --fp8-format" for what, v, m, fix in checks if v % m]


def token_multiple(cfg, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Tokens per micro-batch (rows x length) must be a multiple of this under FP8."""
    tokens = _align(cfg)[0]
    if cfg.transformer_impl == "transformer_engine" and sequence_parallel and tp > 1:
        return tokens * tp  # TE checks its local sequence shard: rows x length / tp % 8
    return tokens


def length_multiple(cfg, tp: int = 1, sequence_parallel: bool = False, rows: int = 1) -> int:
    """Sequence lengths of micro-batches of `rows` rows must be multiples of this: the FP8 token
    rule (1 without FP8) combined with the sequence-parallel split (length % tp)."""
    split = tp if sequence_parallel and tp > 1 else 1
    if cfg.fp8_format is None:
        return split
    m = token_multiple(cfg, tp, sequence_parallel)
    return math.lcm(m // math.gcd(m, max(1, int(rows))), split)


def round_up(length: int, multiple: int) -> int:
    return -(-int(length) // multiple) * multiple


def length_problems(cfg, tp: int, sequence_parallel: bool, rows: int, rows_what: str,
                    lengths: Sequence[tuple[str, int]]) -> list[str]:
    """One error per config field whose lengths break `length_multiple` (FP8 runs only), e.g.
    "data.sft_length_buckets: 100 -> use multiples of 16 (...)". `lengths`: (field, length) pairs;
    `rows_what` names the rows of a micro-batch (e.g. "training.micro_batch_size=1")."""
    if cfg.fp8_format is None:
        return []
    m = length_multiple(cfg, tp, sequence_parallel, rows)
    bad: dict[str, list[int]] = {}
    for field, n in lengths:
        if n % m:
            bad.setdefault(field, []).append(int(n))
    why = (f"FP8 ({cfg.transformer_impl}) needs {rows_what} x length tokens per micro-batch divisible by "
           f"{token_multiple(cfg, tp, sequence_parallel)}" + (f" and the length by TP={tp} (sequence parallel)"
                                                               if sequence_parallel and tp > 1 else ""))
    return [f"{field}: {', '.join(map(str, vals))} -> use multiples of {m} ({why}; e.g. "
            f"{', '.join(str(round_up(v, m)) for v in vals)})" for field, vals in bad.items()]
