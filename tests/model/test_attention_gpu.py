"""On a CUDA GPU (`pytest -m gpu`): masked attention at the 7B head shape (28 query / 4 KV heads,
D = 128, bf16) runs on a fused SDPA kernel, never math, forward and backward, and equals the fp64
reference; its memory at S = 4096 is far below one fp32 [B, h, S, S] score matrix; Transformer
Engine's "padding" path runs with TE's unfused backend switched off and gives the local logits.

Tolerance (bf16): q/k/v are bf16 (exact in fp64); the fused kernels accumulate in fp32 but round
the probabilities to bf16 for the P V product and the output to bf16, each a relative error of at
most 2^-9 of a convex combination of v, so |err| <= 2 * 2^-9 * max|v|; atol = 4 * 2^-9 * max|v|.
"""
import importlib.util
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_diffu.diffusion.objective import annealed_attention_mask
from megatron_diffu.model.attention import attention, attention_plan, build_attention_mask
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
H, G, D = 28, 4, 128


def _reference(q, k, v, allowed):
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def _inputs(b, sq, sk, form, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, s, D, device="cuda", generator=g).bfloat16().requires_grad_(requires_grad)
               for n, s in ((H, sq), (G, sk), (G, sk)))
    a = torch.ones(b, sk, dtype=torch.bool, device="cuda")
    a[0, : sk // 3] = False  # left padding
    if b > 1:
        a[1, sk - sk // 5:] = False  # right padding
    p = sk - sq
    if form == "annealing":
        raw = annealed_attention_mask(torch.arange(b), sk, 0.3, seed=1).cuda()
        allowed = raw | torch.eye(sk, dtype=torch.bool, device="cuda")
    else:
        raw, allowed = a, a[:, None, None, :]
    return q, k, v, build_attention_mask(raw, b, sq, prefix_len=p), allowed


@pytest.mark.gpu
@pytest.mark.parametrize("form,sq,sk", [("padding", 1024, 1024), ("annealing", 1024, 1024), ("prefix", 256, 1280)])
def test_masked_attention_runs_fused_forward_and_backward(form, sq, sk):
    q, k, v, mask, allowed = _inputs(2, sq, sk, form, requires_grad=True)
    plan = attention_plan(q, k, v, mask)
    assert plan["backend"] in {"flash_attention", "efficient_attention", "cudnn_attention"}, plan
    with sdpa_kernel(FUSED):  # math not allowed: SDPA raises if the call needs it
        out = attention(q, k, v, mask)
        out.float().square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    want = _reference(q.detach(), k.detach(), v.detach(), allowed)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4 * 2.0 ** -9 * float(v.abs().max()))


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["padding", "annealing"])
def test_masked_attention_memory_at_4096(form):
    s = 4096
    q, k, v, mask, _ = _inputs(1, s, s, form)
    scores = H * s * s * 4  # one fp32 [1, h, S, S] score matrix: what the math kernel materialises
    with torch.no_grad():
        peak = _peak_bytes(lambda: attention(q, k, v, mask))
    # expanded K/V (2 x [1, h, S, D] bf16 = 58 MiB) and a 4-D mask as a bf16 bias (32 MiB) at most
    assert peak < scores / 8, (peak / 2**20, scores / 2**20)


def _te_pair():
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("Transformer Engine is not installed")
    base = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                vocab_size=512, bf16=True)
    local = DiffusionTransformer(TransformerConfig.from_preset("tiny", **base), device="cuda").cuda().eval()
    te_model = DiffusionTransformer(TransformerConfig.from_preset("tiny", transformer_impl="transformer_engine",
                                                                  **base), device="cuda").cuda().eval()
    return local, te_model


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["right", "left"])
def test_te_padding_runs_without_the_unfused_backend(monkeypatch, side):
    local, te_model = _te_pair()
    monkeypatch.setenv("NVTE_UNFUSED_ATTN", "0")  # read at each backend selection: fused / flash only
    try:  # force a fresh selection (TE caches it per attention shape)
        from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention as dpa
        dpa._attention_backends["backend_selection_requires_update"] = True
    except (ImportError, AttributeError, KeyError):
        pass
    s = 128
    ids = torch.randint(0, 512, (2, s), device="cuda")
    a = torch.arange(s, device="cuda").expand(2, s) < torch.tensor([[s], [90]], device="cuda")
    if side == "left":
        a = a.flip(-1)
    with torch.no_grad():
        want = local(ids, attention_mask=a).float()
        got = te_model(ids, attention_mask=a).float()
    src = torch.cat([a[:, :1], a[:, :-1]], 1)  # logits whose shifted source is a real token
    assert torch.isfinite(got).all()
    assert (got[src] - want[src]).abs().max() < 0.05 * want.abs().max()
