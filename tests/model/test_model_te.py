"""Transformer Engine backend: a clear error without TE/CUDA (CPU), and on a GPU with TE the
TE model (same canonical weights) equals the local model; FP8 stays close to bf16."""
import importlib.util

import pytest
import torch

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(torch.cuda.is_available() and HAS_TE, reason="TE and CUDA present")
def test_te_missing_gives_clear_error():
    cfg = TransformerConfig.from_preset("tiny", transformer_impl="transformer_engine")
    with pytest.raises(RuntimeError, match="transformer_impl='transformer_engine'.*--transformer-impl local"):
        DiffusionTransformer(cfg)


def _te_or_skip():
    if not HAS_TE:
        pytest.skip("Transformer Engine is not installed")


def _pair(**kw):
    base = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                vocab_size=512)
    local = DiffusionTransformer(TransformerConfig.from_preset("tiny", **base, **kw), device="cuda").cuda().eval()
    te_model = DiffusionTransformer(TransformerConfig.from_preset("tiny", transformer_impl="transformer_engine",
                                                                  **base, **kw), device="cuda").cuda().eval()
    assert local.sharded_state_dict().keys() == te_model.sharded_state_dict().keys()
    for (n, (a, _)), (_, (b, _)) in zip(sorted(local.sharded_state_dict().items()),
                                        sorted(te_model.sharded_state_dict().items())):
        assert torch.equal(a, b), n  # same seeded canonical init
    return local, te_model


@pytest.mark.gpu
def test_te_matches_local_bf16_with_padding():
    _te_or_skip()
    local, te_model = _pair(bf16=True)
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    pad = torch.ones(2, 64, dtype=torch.long, device="cuda")
    pad[1, :10] = 0
    with torch.no_grad():
        a, b = local(ids, attention_mask=pad).float(), te_model(ids, attention_mask=pad).float()
        c, d = local(ids).float(), te_model(ids).float()
    real = pad.bool()
    real = torch.cat([real[:, :1], real[:, :-1]], 1)  # logits whose (shifted) source is a real token:
    # a padded row's output is meaningless (local: it sees the real keys; TE "padding": zero)
    assert (a[real] - b[real]).abs().max() < 0.05 * a.abs().max()
    assert (c - d).abs().max() < 0.05 * c.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_te_fp8_runs_and_trains(fmt):
    _te_or_skip()
    _, ref = _pair(bf16=True)
    cfg = TransformerConfig.from_preset("tiny", num_layers=2, hidden_size=256, ffn_hidden_size=512,
                                        num_attention_heads=4, num_query_groups=2, vocab_size=512, bf16=True,
                                        transformer_impl="transformer_engine", fp8_format=fmt)
    model = DiffusionTransformer(cfg, device="cuda").cuda().train()
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    out = model(ids)
    torch.nn.functional.cross_entropy(out.float().view(-1, 512), ids.view(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        base = ref(ids).float()
    rel = (out.detach().float() - base).norm() / base.norm()
    assert rel < 0.1, rel
