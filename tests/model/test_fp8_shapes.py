"""Issue 16 item 8: FP8 GEMM shape rules checked when a run starts (model/fp8_shapes.py), against
the rules written out plainly here: native `_scaled_mm` wants tokens, in and out % 16; TE's
`assert_dim_for_fp8_exec` wants its local tokens % 8, in % 16, out % 8 (tokens = rows x length,
divided by TP under sequence parallelism for TE); sequence parallelism also splits the length."""
import itertools

import numpy as np
import pytest
import torch

from megatron_diffu.config import ConfigError
from megatron_diffu.data.sft import SFTCollator, SFTDataConfig
from megatron_diffu.model import fp8_shapes
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.stages.diffusion.config import PretrainRunConfig, SFTRunConfig


def _model(**kw):
    return TransformerConfig(**{"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                                "num_attention_heads": 4, "num_query_groups": 2, "fp8_format": "hybrid", **kw})


def _fine(impl, rows, length, tp, sp) -> bool:
    """The rule, written out: which (rows, length) micro-batches every FP8 GEMM accepts."""
    if sp and length % tp:
        return False
    tokens = rows * length
    if impl == "local":
        return tokens % 16 == 0  # gathered sequence under SP
    local = tokens // tp if sp else tokens
    return local % 8 == 0


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_length_rule_matches_the_written_rule(impl):
    cfg = _model(transformer_impl=impl)
    for rows, length, tp, sp in itertools.product((1, 2, 3, 4, 6, 8, 16), range(1, 70), (1, 2, 4), (False, True)):
        got = fp8_shapes.length_problems(cfg, tp, sp, rows, "rows", [("data.seq_length", length)])
        assert (not got) == _fine(impl, rows, length, tp, sp), (rows, length, tp, sp, got)


@pytest.mark.parametrize("overrides, tp, needle", [
    (dict(ffn_hidden_size=136), 1, "model.ffn_hidden_size / TP = 136/1 = 136 is not a multiple of 16"),
    (dict(ffn_hidden_size=144), 2, "model.ffn_hidden_size / TP = 144/2 = 72 is not a multiple of 16"),
    (dict(hidden_size=72, kv_channels=16), 1, "model.hidden_size = 72 is not a multiple of 16"),
    (dict(kv_channels=10), 1, "num_attention_heads * head_dim / TP = 4*10/1 = 40 is not a multiple of 16"),
    (dict(num_query_groups=1, kv_channels=12), 1, "* head_dim / TP = (4+2*1)*12/1 = 72 is not a multiple of 16"),
])
def test_each_bad_model_size_is_named(overrides, tp, needle):
    problems = _model(**overrides).problems(tp_size=tp)
    assert len(problems) == 1 and needle in problems[0], problems
    assert not _model(**overrides, fp8_format=None).problems(tp_size=tp)  # only FP8 asks for it


def test_te_rule_accepts_qkv_out_of_8():
    # (Q + 2G) D = 72: TE's weight rule is out % 8, the native _scaled_mm one out % 16
    assert not _model(num_query_groups=1, kv_channels=12, transformer_impl="transformer_engine").problems()
    assert _model(num_query_groups=1, kv_channels=12).problems()
    assert not _model().problems(tp_size=2)  # good sizes pass


def _run_cfg(cls, seq, mbs, model=None, parallel=None, **sections):
    d = {"model": {"fp8_format": "hybrid", **(model or {})}, "data": {"seq_length": seq, "mock_data": True},
         "training": {"micro_batch_size": mbs, "train_iters": 1}, "parallel": parallel or {}, **sections}
    return cls.from_dict(d)


def test_stage_lengths_are_checked_at_start_up():
    bad = _run_cfg(PretrainRunConfig, 100, 1)
    assert bad.fp8_shape_problems() == [
        "data.seq_length: 100 -> use multiples of 16 (FP8 (local) needs training.micro_batch_size=1 x length tokens "
        "per micro-batch divisible by 16; e.g. 112)"]
    with pytest.raises(ConfigError, match=r"data.seq_length: 100 -> use multiples of 16"):
        bad.validate(1)
    _run_cfg(PretrainRunConfig, 100, 16).validate(1)  # 16 x 100 tokens: fine
    _run_cfg(PretrainRunConfig, 100, 1, model={"fp8_format": None}).validate(1)  # no FP8, no rule

    sft = _run_cfg(SFTRunConfig, 512, 1, sft={"sft_length_buckets": [100, 256, 1000]})
    assert [p.split(" (")[0] for p in sft.fp8_shape_problems()] == ["sft.sft_length_buckets: 100 -> use multiples of 16"]
    te = _run_cfg(SFTRunConfig, 512, 1, model={"transformer_impl": "transformer_engine"},
                  sft={"sft_length_buckets": [104, 256]})
    assert not te.fp8_shape_problems()  # TE: 104 tokens % 8
    sp = _run_cfg(PretrainRunConfig, 1000, 1, model={"transformer_impl": "transformer_engine"},
                  parallel={"tensor_model_parallel_size": 2, "sequence_parallel": True})
    assert [p.split(" (")[0] for p in sp.fp8_shape_problems()] == ["data.seq_length: 1000 -> use multiples of 16"]
    assert "and the length by TP=2 (sequence parallel)" in sp.fp8_shape_problems()[0]


def _conv(n, first):
    return np.arange(first, first + n, dtype=np.int64), np.ones(n, dtype=bool)


@pytest.mark.parametrize("multiple", [1, 16])
def test_cut_buckets_pad_to_the_length_multiple(multiple):
    cfg = SFTDataConfig(sft_length_buckets=[32, 64], sft_response_cutoff=True, sft_cut_length_multiple=1)  # FP8's alone
    batch = SFTCollator(64, 0, cfg, length_multiple=multiple)([[_conv(19, 1)], [_conv(21, 100)]], [0, 1])
    cut = 21  # the longest row: padding beyond it is cut
    length = cut if multiple == 1 else 32  # ceil(21 / 16) * 16
    assert batch["tokens"].shape == (2, length)
    assert torch.equal(batch["tokens"][1, :cut], torch.arange(100, 121))
    assert not batch["maskable"][:, cut:].any()
    if multiple > 1:  # the extra positions are padding nobody attends to
        assert torch.equal(batch["attention_mask"], (torch.arange(length) < cut).expand(2, length))
    else:
        assert "attention_mask" not in batch
