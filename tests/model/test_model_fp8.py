"""Torch-native FP8 (model/fp8.py): scales and amax history as TE's delayed scaling, saturating
casts to the float8 dtypes, the emulated GEMM against an fp32 emulation, training through it on
CPU; on a GPU `torch._scaled_mm` and loss parity with bf16 over a few steps."""
import pytest
import torch

from megatron_diffu.model import fp8
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer


def test_scale_rules_match_transformer_engine():
    prev = torch.tensor(3.0)
    assert fp8.compute_scale(torch.tensor(2.0), prev, 448.0).item() == pytest.approx(224.0)
    assert fp8.compute_scale(torch.tensor(2.0), prev, 448.0, margin=1).item() == pytest.approx(112.0)
    assert fp8.compute_scale(torch.tensor(0.0), prev, 448.0).item() == 3.0  # zero amax keeps the scale
    assert fp8.compute_scale(torch.tensor(float("inf")), prev, 448.0).item() == 3.0


def test_amax_history_includes_the_current_tensor():
    st = fp8.ScalingState(3, fp8.E4M3)
    for v, want in ((4.0, 448 / 4), (1.0, 448 / 4), (2.0, 448 / 4), (1.0, 448 / 2), (1.0, 448 / 2), (0.5, 448.0)):
        s = st.update(torch.tensor([v, -v / 2]))
        assert s.item() == pytest.approx(want)


def test_casts_saturate_and_round_like_the_dtypes():
    x = torch.tensor([1e6, -1e6, 0.3, -2.7])
    q = fp8.cast_to_fp8(x, torch.tensor(1.0), fp8.E4M3)
    assert q.dtype == torch.float8_e4m3fn and q.float()[:2].tolist() == [448.0, -448.0]
    assert q.float()[2:].tolist() == x[2:].to(torch.float8_e4m3fn).float().tolist()
    g = fp8.cast_to_fp8(x, torch.tensor(1.0), fp8.E5M2)
    assert g.float()[0].item() == 57344.0


def test_emulated_gemm_equals_an_fp32_emulation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    sa, sb = 448 / a.abs().max(), 448 / b.abs().max()
    aq, bq = fp8.cast_to_fp8(a, sa, fp8.E4M3), fp8.cast_to_fp8(b, sb, fp8.E4M3)
    ref = (aq.float() / sa) @ (bq.float() / sb).t()
    out = fp8.fp8_mm(aq, sa, bq, sb, torch.float32)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - a @ b.t()).abs().max() < 0.1 * (a @ b.t()).abs().max()  # e4m3: ~2 bits of mantissa lost


def _model():
    return DiffusionTransformer(TransformerConfig.from_preset("tiny", hidden_size=64, ffn_hidden_size=128))


def test_fp8_model_trains_close_to_fp32_on_cpu(one_thread):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, model = _model(), _model()
    assert fp8.enable_fp8(model, fp8.Fp8Recipe("hybrid")) == 8  # 4 linears x 2 layers
    out, base = model(ids), ref(ids)
    assert ((out - base).norm() / base.norm()) < 0.1
    torch.nn.functional.cross_entropy(out.view(-1, 256), ids.view(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # no-grad passes (sampling, reference log-probs) run unquantised
        assert torch.equal(model(ids), ref(ids))
    fp8.enable_fp8(model, None)


@pytest.mark.gpu
def test_scaled_mm_and_loss_parity_with_bf16_on_gpu():
    a = torch.randn(64, 128, device="cuda")
    b = torch.randn(32, 128, device="cuda")
    s = torch.tensor(448.0 / 4, device="cuda")
    aq, bq = fp8.cast_to_fp8(a, s, fp8.E4M3), fp8.cast_to_fp8(b, s, fp8.E4M3)
    ref = (aq.float() / s) @ (bq.float() / s).t()
    assert torch.allclose(fp8.fp8_mm(aq, s, bq, s, torch.float32), ref, rtol=1e-3, atol=1e-3)
    losses = {}
    for name in ("bf16", "fp8"):
        torch.manual_seed(0)
        cfg = TransformerConfig.from_preset("tiny", hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                                            num_query_groups=2, vocab_size=512, bf16=True)
        model = DiffusionTransformer(cfg, device="cuda").cuda().train()
        if name == "fp8":
            fp8.enable_fp8(model, fp8.Fp8Recipe("hybrid"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 512, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        losses[name] = []
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(ids).float().view(-1, 512), ids.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    for a_, b_ in zip(losses["bf16"], losses["fp8"]):
        assert abs(a_ - b_) < 0.05 * a_, losses
