"""Masked attention (model/attention.py) equals a plain fp64 attention written here, for every mask
form the model takes (key padding, 4-D annealing masks, prefix KV, rows without a key), on the
default kernel and with the K/V heads expanded (the path a GPU takes when GQA would fall to the
math kernel); Transformer Engine's mask types (stand-in: tests/model/fake_te.py, which reads
"padding" as TE's fused kernel does) give the local model's logits.

Tolerance: the kernels compute in fp32 (unit roundoff u = 2^-24 ~ 6e-8), the reference in fp64.
An output element is sum_j p_j v_j after a D-term dot product per score and an Sk-term softmax
sum: each sum contributes rounding errors of a few ulp that grow like sqrt(terms) (random signs),
so |err| ~ few * u * sqrt(D + Sk) * max|v| ~ 3 * 6e-8 * 9 * 3 ~ 5e-6 for D = 16, Sk <= 64 and
|v| <= ~3 (standard normal); atol 1e-5 is that with 2x headroom (measured: ~1e-6).
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fake_te
from megatron_diffu.diffusion.objective import annealed_attention_mask
from megatron_diffu.model.attention import attention, attention_plan, build_attention_mask
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer

B, H, G, D = 3, 4, 2, 16
ATOL = 1e-5


def reference(q, k, v, allowed):
    """softmax(q k^T / sqrt(D) + mask) v in fp64, GQA by explicit head repetition; allowed: bool
    broadcastable to [B, H, Sq, Sk] or None."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def qkv(sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, sq, D, generator=g), torch.randn(B, G, sk, D, generator=g),
            torch.randn(B, G, sk, D, generator=g))


def padding(sk):
    a = torch.ones(B, sk, dtype=torch.bool)
    a[1, :5] = False  # left padding (sampler, GRPO)
    a[2, sk - 7:] = False  # right padding (SFT)
    return a


def check(q, k, v, mask, want):
    """The default kernel and the expanded-heads math kernel both equal `want` (fp64)."""
    got = attention(q, k, v, mask)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    with sdpa_kernel([SDPBackend.MATH]):  # GQA on math -> K/V heads repeated first, as on a GPU
        plan = attention_plan(q, k, v, mask)
        assert plan["backend"] == "math" and plan["expanded_kv"]
        torch.testing.assert_close(attention(q, k, v, mask).double(), want, atol=ATOL, rtol=0)
    return got


@pytest.mark.parametrize("sk", [24, 61])
def test_padding_is_compact_key_padding_and_real_rows_keep_the_pairwise_rule(sk):
    q, k, v = qkv(sk, sk)
    a = padding(sk)
    mask = build_attention_mask(a.long(), B, sk)
    assert mask.key_padding and tuple(mask.allowed.shape) == (B, 1, 1, sk) and not mask.right_padded
    got = check(q, k, v, mask, reference(q, k, v, a[:, None, None, :]))
    pair = a[:, None, :, None] & a[:, None, None, :]
    pair = pair | (~pair.any(-1, keepdim=True) & torch.eye(sk, dtype=torch.bool))  # the old rule
    real = a[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got.double()[real], reference(q, k, v, pair)[real], atol=ATOL, rtol=0)
    assert attention_plan(q, k, v, mask)["mask_shape"] == (B, 1, 1, sk)
    right = build_attention_mask(torch.arange(sk).expand(B, sk) < torch.tensor([[sk], [sk - 3], [4]]), B, sk)
    assert right.key_padding and right.right_padded


def test_annealing_mask_and_rows_without_keys():
    s = 32
    q, k, v = qkv(s, s, seed=1)
    anneal = annealed_attention_mask(torch.arange(B), s, 0.3, seed=5)  # [B, 1, S, S] causal | Bernoulli
    anneal[0, 0, 7] = False  # a row with no key: it gets its own key
    anneal[2, 0, :, 3] = False
    mask = build_attention_mask(anneal, B, s)
    assert not mask.key_padding and tuple(mask.allowed.shape) == (B, 1, s, s)
    want_mask = anneal.clone()
    want_mask[0, 0, 7, 7] = True
    got = check(q, k, v, mask, reference(q, k, v, want_mask))
    torch.testing.assert_close(got[0, :, 7].double(), v[0, :, 7].double().repeat_interleave(H // G, 0),
                               atol=ATOL, rtol=0)  # own key only: the output is its own value
    causal = build_attention_mask(torch.ones(s, s, dtype=torch.bool).tril()[None, None], B, s)
    assert tuple(causal.allowed.shape) == (1, 1, s, s)  # batch-1 masks are broadcast, not copied
    check(q, k, v, causal, reference(q, k, v, torch.ones(s, s, dtype=torch.bool).tril()))


def test_prefix_kv_keys_longer_than_queries():
    p, s = 40, 9
    q, k, v = qkv(s, p + s, seed=2)
    a = padding(p + s)
    a[2, p + s - 7:] = True
    a[2, p - 3:p] = False  # padding inside the cached prefix
    mask = build_attention_mask(a, B, s, prefix_len=p)
    assert mask.key_padding and not mask.right_padded
    check(q, k, v, mask, reference(q, k, v, a[:, None, None, :]))
    four_d = a[:, None, p:, None] & a[:, None, None, :]  # the sampler's old pairwise form
    four_d[:, :, :, p:] &= torch.rand(s, s, generator=torch.Generator().manual_seed(0)) < 0.7
    want = four_d | (~four_d.any(-1, keepdim=True) & (torch.arange(p + s) == p + torch.arange(s)[:, None]))
    check(q, k, v, build_attention_mask(four_d, B, s, prefix_len=p), reference(q, k, v, want))


def test_a_sample_without_real_tokens_falls_back_to_the_own_key_rule():
    s = 12
    q, k, v = qkv(s, s, seed=3)
    a = padding(s)
    a[0] = False
    mask = build_attention_mask(a, B, s)
    assert not mask.key_padding
    pair = (a[:, None, :, None] & a[:, None, None, :]) | (~a[:, None, :, None] & torch.eye(s, dtype=torch.bool))
    got = check(q, k, v, mask, reference(q, k, v, pair))
    assert torch.isfinite(got).all()
    assert build_attention_mask(torch.ones(B, s), B, s) is None


# ---------------------------------------------------------------------- Transformer Engine mask types
def _te_and_local(monkeypatch, **kw):
    fake_te.install(monkeypatch)
    cfg = dict(num_layers=2, **kw)
    te_model = DiffusionTransformer(TransformerConfig.from_preset("tiny", transformer_impl="transformer_engine", **cfg))
    return te_model, DiffusionTransformer(TransformerConfig.from_preset("tiny", **cfg))


def _mask_types(model):
    calls = [c["attn_mask_type"] for layer in model.decoder.layers.values()
             for c in layer.self_attention.core_attention.calls]
    for layer in model.decoder.layers.values():
        layer.self_attention.core_attention.calls.clear()
    return calls


@pytest.mark.parametrize("case", ["right", "left", "annealing", "none"])
def test_te_mask_types_give_the_local_logits(monkeypatch, case):
    te_model, local = _te_and_local(monkeypatch)
    s = 16
    ids = torch.randint(0, 256, (B, s), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([[s], [11], [5]])
    a = torch.arange(s).expand(B, s) < lengths  # right padding
    if case == "left":
        a = a.flip(-1)
    mask = {"right": a.long(), "left": a.long(), "none": None,
            "annealing": annealed_attention_mask(torch.arange(B), s, 0.4, seed=2)}[case]
    want_type = {"right": "padding", "left": "padding", "annealing": "arbitrary", "none": "no_mask"}[case]
    te_model.train()  # forward + backward: padded rows (NaN in the stand-in) must not reach a gradient
    out = te_model(ids, attention_mask=mask)
    assert _mask_types(te_model) == [want_type] * 2
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in te_model.parameters())
    with torch.no_grad():
        want = local.eval()(ids, attention_mask=mask)
        got = te_model.eval()(ids, attention_mask=mask)
    src = torch.ones(B, s, dtype=torch.bool) if case in ("none", "annealing") else torch.cat([a[:, :1], a[:, :-1]], 1)
    # same weights and math, other module layout / token order inside attention: fp32 summation order
    # only, u * (accumulation depth ~ a few hundred) * max|logit|
    bound = 2.0 ** -24 * 1024 * float(want.abs().max())
    torch.testing.assert_close(got[src], want[src], rtol=0, atol=bound)
    assert torch.isfinite(got).all()


def test_te_prefix_kv_uses_arbitrary_key_padding(monkeypatch):
    te_model, local = _te_and_local(monkeypatch, logit_shift=False)
    p, s = 6, 5
    ids = torch.randint(0, 256, (2, p + s), generator=torch.Generator().manual_seed(5))
    pad = torch.ones(2, p + s, dtype=torch.long)
    pad[1, :2] = 0
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    outs = []
    for model in (local.eval(), te_model.eval()):
        with torch.no_grad():
            _, kv = model(ids[:, :p], attention_mask=pad[:, :p], return_kv=True)
            outs.append(model(ids[:, p:], attention_mask=pad, position_ids=pos[:, p:], prefix_kv=kv))
    assert _mask_types(te_model) == ["padding", "arbitrary"] * 2  # per layer: cache call, cached call
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2.0 ** -24 * 1024 * float(outs[0].abs().max()))


def test_dropout_still_applies_with_a_mask():
    q, k, v = qkv(8, 8, seed=6)
    mask = build_attention_mask(padding(8), B, 8)
    torch.manual_seed(0)
    a = attention(q, k, v, mask, dropout_p=0.5)
    assert not torch.allclose(a, attention(q, k, v, mask)) and torch.isfinite(a).all()
