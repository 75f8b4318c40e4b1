"""The output layer over masked positions pads its rows to a multiple of HEAD_ROW_MULTIPLE (one GEMM
shape per 64 rows instead of one per step: a per-shape kernel cache grew the bf16 CPU process by
~5 MB a step). Returned logits and gradients equal a plain F.linear over the N real rows."""
import torch
import torch.nn.functional as F

from megatron_diffu.model.transformer import HEAD_ROW_MULTIPLE, _rows_padded_linear


def test_padded_rows_are_invisible_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g)
    for n in (1, 63, 64, 65, 130):
        x = torch.randn(n, 16, dtype=torch.float64, generator=g, requires_grad=True)
        wr = w.clone().requires_grad_(True)
        y = _rows_padded_linear(x, wr)
        assert y.shape == (n, 50)
        # fp64: each logit is one 16-term dot product; another GEMM shape may sum it in another order,
        # |error| <= 16 u sum|x_k w_k| ~ 16 * 1.1e-16 * 16 = 3e-14 for these unit normals
        torch.testing.assert_close(y, F.linear(x, w), rtol=0, atol=1e-13)
        up = torch.randn(n, 50, dtype=torch.float64, generator=g)
        gx, gw = torch.autograd.grad((y * up).sum(), (x, wr))
        torch.testing.assert_close(gx, up @ w, rtol=0, atol=1e-12)  # 50-term sums: 50 u 50
        torch.testing.assert_close(gw, up.t() @ x.detach(), rtol=0, atol=1e-12)  # <= 130 terms


def test_row_counts_share_a_gemm_shape():
    seen = []
    orig = F.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0])
        return orig(x, w, b)

    F.linear = spy
    try:
        for n in range(1, 3 * HEAD_ROW_MULTIPLE + 1):
            _rows_padded_linear(torch.zeros(n, 4), torch.zeros(3, 4))
    finally:
        F.linear = orig
    assert sorted(set(seen)) == [HEAD_ROW_MULTIPLE, 2 * HEAD_ROW_MULTIPLE, 3 * HEAD_ROW_MULTIPLE]
