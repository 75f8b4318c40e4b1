"""The fused AdamW path of MixedPrecisionAdamW (default for bf16 models, opt-in for fp32) against
a plain per-parameter AdamW written here (decoupled decay on >1-D weights only, bias correction,
clipping by the global norm), fp32 and bf16 (fp32 master); its cut of the flat buffer into kernel
views (aligned bodies, independent of the layout); and the default kernel per dtype."""
import math

import pytest
import torch

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.parallel.state import ProcessGrid
from megatron_diffu.stages.diffusion.config import PretrainRunConfig
from megatron_diffu.training import optimizer as optim_mod
from megatron_diffu.training.optimizer import MixedPrecisionAdamW

pytestmark = pytest.mark.skipif(optim_mod._FUSED is None, reason="torch has no fused AdamW kernel")


def _plain_adamw(params, grads, state, step, lr, cfg, clip_coef):
    """One AdamW step per parameter, the textbook formula (fp64 scalars, fp32 tensors)."""
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    for name, p in params.items():
        g = grads[name] * clip_coef
        m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
        if p.dim() > 1 and not name.endswith(".bias"):
            p.mul_(1.0 - lr * cfg.weight_decay)
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).add_(g * g, alpha=1.0 - b2)
        denom = v.sqrt() / math.sqrt(1.0 - b2 ** step) + cfg.adam_eps
        p.add_(-lr / (1.0 - b1 ** step) * m / denom)


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_adamw_equals_the_plain_formula_with_clipping(bf16):
    cfg = PretrainRunConfig.from_args(["--weight-decay", "0.1", "--clip-grad", "0.05", "--adam-beta2", "0.99",
                                       "--adam-eps", "1e-4"]).optimizer
    torch.manual_seed(0)
    model = DiffusionTransformer(TransformerConfig.from_preset("tiny", vocab_size=64, bf16=bf16))
    opt = MixedPrecisionAdamW(model, cfg, ProcessGrid.single(), fused=True)
    assert opt.fused
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    state: dict = {}
    x = torch.randint(0, 64, (2, 8))
    for step in range(1, 4):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.reduce_gradients()
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        norm = opt.grad_norm()
        want_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        # a sum of squares in fp32 over k terms is within k * u of the exact one (all terms >= 0)
        assert norm == pytest.approx(want_norm, rel=opt.numel * 2.0 ** -24)
        opt.step(1e-2, norm)
        coef = min(1.0, cfg.clip_grad / (norm + 1e-6))
        _plain_adamw(ref, grads, state, step, 1e-2, cfg, coef)
        master = {e.name: opt.master[e.start:e.start + e.numel].view_as(e.param) for e in opt.entries}
        for n, p in model.named_parameters():
            got = master[n] if bf16 else p.detach()
            # elementwise fp32 updates (the clip coefficient is the same number on both sides): the fused
            # kernel and the formula differ by a few ulp per step; 1e-5 relative (+1e-6 for values near 0,
            # parameters are O(0.02-1)) bounds 3 steps of that with margin and is far below one update
            assert torch.allclose(got, ref[n], rtol=1e-5, atol=1e-6), (step, n)
            if bf16:
                assert torch.equal(p.detach(), got.to(torch.bfloat16)), n


def test_fused_and_per_op_paths_agree():
    cfg = PretrainRunConfig.from_args(["--weight-decay", "0.1", "--clip-grad", "0.5", "--adam-eps", "1e-4"]).optimizer
    x = torch.randint(0, 64, (2, 8))
    out = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = DiffusionTransformer(TransformerConfig.from_preset("tiny", vocab_size=64))
        opt = MixedPrecisionAdamW(model, cfg, ProcessGrid.single(), fused=fused)
        assert opt.fused is fused
        for _ in range(3):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step(1e-3, opt.grad_norm())
        out[fused] = opt.master.clone(), opt.exp_avg.clone(), opt.exp_avg_sq.clone()
    for a, b in zip(out[True], out[False]):  # a few ulp apart (the kernel rounds its own way)
        assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (a - b).abs().max()


def test_fused_views_cover_each_segment_once_with_aligned_bodies():
    model = DiffusionTransformer(TransformerConfig.from_preset("tiny", vocab_size=64))
    opt = MixedPrecisionAdamW(model, PretrainRunConfig.from_args([]).optimizer, ProcessGrid.single(), fused=True)
    base = opt.master.data_ptr()
    spans = []
    for decay, (p, g, m, v) in opt._views.items():
        for t, gt in zip(p, g):
            a = (t.data_ptr() - base) // t.element_size()
            spans.append((a, a + t.numel(), decay))
            assert gt.numel() == t.numel()
            # an element is in an aligned body or in an edge shorter than _ALIGN
            assert t.numel() < optim_mod._ALIGN or (a % optim_mod._ALIGN == 0 and t.numel() % optim_mod._ALIGN == 0)
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == opt.numel
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))  # contiguous, no overlap
    for a, b, decay in spans:
        seg = [s for s in opt._segments if s[0] <= a and b <= s[1]]
        assert seg and seg[0][2] == decay


def test_default_kernel_is_per_op_for_fp32_and_fused_for_bf16():
    cfg = PretrainRunConfig.from_args([]).optimizer
    for bf16 in (False, True):
        model = DiffusionTransformer(TransformerConfig.from_preset("tiny", vocab_size=64, bf16=bf16))
        assert MixedPrecisionAdamW(model, cfg, ProcessGrid.single()).fused is bf16  # fp32: bit-exact per-op
        assert MixedPrecisionAdamW(model, cfg, ProcessGrid.single(), fused=not bf16).fused is (not bf16)
