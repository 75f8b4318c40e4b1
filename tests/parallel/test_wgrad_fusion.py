"""Gradient accumulation fusion (parallel/layers.py): weight gradients added into `main_grad`
inside the GEMM / scatter-add instead of a new tensor that is then added.

- Layer level, fp32 (the production dtype), two micro-batches: `main_grad` equals the plain
  formula dW = sum over micro-batches and tokens of g_t x_t^T (embedding: the sum of g_t over the
  tokens with that id), evaluated in fp64, within the forward-error bound of a length-n fp32 sum,
  gamma_n * sum |terms| with gamma_n = n u / (1 - n u), u = 2^-24 (any summation order meets it).
- Model level, fp64, tied and untied heads, 2 micro-batches, padding and masked positions: every
  parameter's accumulated gradient is the unfused autograd gradient (activation gradients are the
  same ops in both; only the order of the dW additions differs: ~1e-16 relative).
- TP = 2 (gloo, 2 processes): the same on each rank's shards (vocab-parallel embedding rows of
  the other rank included), with and without sequence parallelism.
- The optimizer marks only parameters whose dtype matches their fp32 main_grad (bf16 keeps the
  hook path), and `--no-gradient-accumulation-fusion` reaches it.
"""
from __future__ import annotations

import pytest
import torch

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_diffu.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, fuses_wgrad
from megatron_diffu.parallel.state import ProcessGrid
from megatron_diffu.testing import run_distributed

U32 = 2.0 ** -24


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _arm(params, fused: bool) -> None:
    """What the optimizer does: .grad is the main_grad buffer; fused weights add into it directly."""
    for p in params:
        p.main_grad = torch.zeros_like(p)
        p.grad = p.main_grad
        p.fuse_wgrad_accumulation = fused


# ------------------------------------------------------------------------------ layer level, fp32
@pytest.mark.parametrize("kind", ["column_qkv", "row_bias"])
def test_linear_main_grad_is_the_formula(kind):
    torch.manual_seed(0)
    h, micro = 48, 2
    if kind == "column_qkv":  # the fused-QKV weight (groups, rows per group, hidden), a 3-D parameter
        layer = ColumnParallelLinear(h, 2 * 5 * 16, weight_shape=(2, 5 * 16, h), shard_dim=0)
    else:
        layer = RowParallelLinear(h, 40, bias=True)
    torch.nn.init.normal_(layer.weight, std=0.5)
    params = [p for p in layer.parameters()]
    _arm(params, fused=True)
    w_sum64 = torch.zeros(layer.weight.shape, dtype=torch.float64).view(-1, h)
    abs_sum64 = torch.zeros_like(w_sum64)
    bias64 = bias_abs64 = 0.0
    tokens = 0
    for m in range(micro):
        x = torch.randn(3, 7, h)
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        g2, x2 = g.reshape(-1, g.shape[-1]).double(), x.reshape(-1, h).double()
        w_sum64 += g2.t() @ x2
        abs_sum64 += g2.abs().t() @ x2.abs()
        bias64 = bias64 + g2.sum(0)
        bias_abs64 = bias_abs64 + g2.abs().sum(0)
        tokens += x2.shape[0]
    assert fuses_wgrad(layer.weight)
    got = layer.weight.main_grad.view(-1, h).double()
    bound = gamma(tokens + micro) * abs_sum64
    assert ((got - w_sum64).abs() <= bound).all(), float(((got - w_sum64).abs() - bound).max())
    assert got.abs().max() > 1.0  # a real gradient, not an untouched zero buffer
    if layer.bias is not None:  # not fused: autograd accumulates it into .grad = main_grad
        assert layer.bias.main_grad.data_ptr() == layer.bias.grad.data_ptr()
        assert ((layer.bias.main_grad.double() - bias64).abs() <= gamma(tokens + micro) * bias_abs64).all()


def test_embedding_main_grad_is_the_row_sum_with_duplicates():
    torch.manual_seed(1)
    v, h = 11, 8
    emb = VocabParallelEmbedding(v, h)
    _arm([emb.weight], fused=True)
    want = torch.zeros(v, h, dtype=torch.float64)
    abs_sum = torch.zeros_like(want)
    count = torch.zeros(v)
    for ids in (torch.tensor([[1, 3, 3, 7], [3, 0, 1, 1]]), torch.tensor([[3, 3, 9, 10], [1, 2, 3, 4]])):
        out = emb(ids)
        g = torch.randn_like(out)
        out.backward(g)
        for t, i in enumerate(ids.reshape(-1).tolist()):
            want[i] += g.reshape(-1, h)[t].double()
            abs_sum[i] += g.reshape(-1, h)[t].double().abs()
            count[i] += 1
    got = emb.weight.main_grad.double()
    bound = gamma(int(count.max()) + 1) * abs_sum
    assert ((got - want).abs() <= bound).all()
    assert (got[count == 0] == 0).all() and count[3] == 6  # untouched rows stay zero; id 3 summed 6 times


def test_no_grad_and_unmarked_weights_take_the_plain_path():
    layer = ColumnParallelLinear(8, 8)
    _arm([layer.weight], fused=False)
    assert not fuses_wgrad(layer.weight)
    layer.weight.fuse_wgrad_accumulation = True
    with torch.no_grad():
        assert not fuses_wgrad(layer.weight)
    layer.weight.main_grad = torch.zeros_like(layer.weight, dtype=torch.float64)  # dtype mismatch (bf16 case)
    assert not fuses_wgrad(layer.weight)


# ------------------------------------------------------------------------------ model level, fp64
def _batches(cfg, n=2, b=2, s=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        pad = torch.ones(b, s, dtype=torch.long)
        pad[1, :2] = 0
        pos = torch.rand(b, s, generator=g) < 0.5
        pos[:, 0] = False
        pos[0, 4] = True
        out.append((ids, pad, pos))
    return out


def _accumulated_grads(model, fused: bool, batches, tp_group=None) -> dict:
    params = dict(model.named_parameters())
    _arm(params.values(), fused)
    for ids, pad, pos in batches:
        logits = model(ids, attention_mask=pad, logit_positions=pos)
        vocab_parallel_cross_entropy(logits, ids[pos], tp_group).mean().backward()
    return {n: p.main_grad.clone() for n, p in params.items()}


def _compare(fused: dict, plain: dict) -> None:
    for name, want in plain.items():
        scale = float(want.abs().max())
        # fp64, sums of at most a few dozen terms per element in another order: ~1e-16 relative
        torch.testing.assert_close(fused[name], want, rtol=1e-10, atol=1e-12 * max(scale, 1.0), msg=name)
        assert scale > 0, f"{name}: no gradient at all"


@pytest.mark.parametrize("tied", [True, False])
def test_model_fused_equals_unfused(tied):
    cfg = TransformerConfig.from_preset("tiny", untie_embeddings_and_output_weights=not tied)
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg).double()
    batches = _batches(cfg)
    plain = _accumulated_grads(model, False, batches)
    fused = _accumulated_grads(model, True, batches)
    _compare(fused, plain)


def _tp2(rank: int, sequence_parallel: bool):
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", untie_embeddings_and_output_weights=False)
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    model = DiffusionTransformer(cfg, grid, sequence_parallel=sequence_parallel).double()
    batches = _batches(cfg)
    plain = _accumulated_grads(model, False, batches, grid.tp_group)
    fused = _accumulated_grads(model, True, batches, grid.tp_group)
    _compare(fused, plain)
    return True


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_fused_equals_unfused(sequence_parallel):
    assert run_distributed(_tp2, 2, args=(sequence_parallel,)) == [True, True]


# ------------------------------------------------------------------------------ optimizer wiring
def test_optimizer_marks_only_fp32_parameters_when_asked():
    from megatron_diffu.training.optimizer import MixedPrecisionAdamW
    from megatron_diffu.training.config import OptimizerConfig

    for dtype, asked, expect in ((torch.float32, True, True), (torch.float32, False, False),
                                 (torch.bfloat16, True, False)):
        model = DiffusionTransformer(TransformerConfig.from_preset("tiny")).to(dtype)
        MixedPrecisionAdamW(model, OptimizerConfig(), ProcessGrid.single(), gradient_accumulation_fusion=asked)
        assert {fuses_wgrad(p) for p in model.parameters()} == {expect}


def test_flag_reaches_the_run_config():
    from megatron_diffu.stages.diffusion.config import PretrainRunConfig

    assert PretrainRunConfig.from_args(["--mock-data"]).parallel.gradient_accumulation_fusion is True
    cfg = PretrainRunConfig.from_args(["--mock-data", "--no-gradient-accumulation-fusion"])
    assert cfg.parallel.gradient_accumulation_fusion is False
