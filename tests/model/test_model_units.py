"""Single-process model behaviour: config validation, masks, logit positions, recompute,
prefix KV cache, state-dict round trips, pipeline split, deterministic init."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_diffu.model.config import PRESETS, TransformerConfig
from megatron_diffu.model.transformer import (DiffusionTransformer, build_attention_mask,
                                              global_parameter_shapes, pipeline_layer_split)


def tiny(**kw):
    return TransformerConfig.from_preset("tiny", **kw)


# ---------------------------------------------------------------- config
def test_presets_shapes_and_parameter_counts():
    c = TransformerConfig.from_preset("diffucoder-7b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size,
            c.vocab_size, c.max_position_embeddings, c.rotary_base, c.norm_epsilon) == \
        (28, 3584, 28, 4, 18944, 152064, 32768, 1e6, 1e-6)
    assert 7.5e9 < c.num_parameters() < 7.7e9  # Qwen2.5-Coder-7B: 7.62B
    assert abs(TransformerConfig.from_preset("qwen2.5-0.5b").num_parameters() - 494_032_768) < 1e3
    assert 0.9e8 < TransformerConfig.from_preset("small-100m").num_parameters() < 1.1e8
    for name in PRESETS:
        TransformerConfig.from_preset(name).validate()
    # the counted parameters are the model's parameters
    cfg = tiny()
    assert sum(p.numel() for p in DiffusionTransformer(cfg).parameters()) == cfg.num_parameters()
    assert set(global_parameter_shapes(cfg)) == {n for n, _ in DiffusionTransformer(cfg).named_parameters()}


def test_flops_per_token_matches_hand_count():
    cfg = tiny()
    h, f, d, s = 64, 128, 16, 32
    linear = (4 + 2 * 2) * d * h + 4 * d * h + 3 * f * h
    expected = 3 * (2 * (2 * (linear + 2 * s * 4 * d)) + 2 * cfg.vocab_size * h)
    assert cfg.flops_per_token(s) == expected


@pytest.mark.parametrize("kw,tp,needle", [
    (dict(num_attention_heads=6, num_query_groups=4), 1, "not divisible by num_query_groups"),
    (dict(hidden_size=66), 1, "hidden_size=66 is not divisible by num_attention_heads=4"),
    (dict(), 8, "num_attention_heads=4 is not divisible by tensor_model_parallel_size=8"),
    (dict(num_query_groups=1), 2, "num_query_groups=1 is not divisible by tensor_model_parallel_size=2"),
    (dict(vocab_size=255), 2, "vocab_size=255 is not divisible"),
    (dict(recompute_granularity="most"), 1, "recompute_granularity='most'"),
    (dict(fp8_format="e5m2"), 1, "fp8_format='e5m2'"),
    (dict(transformer_impl="te"), 1, "transformer_impl='te'"),
])
def test_validation_errors_name_the_field(kw, tp, needle):
    cfg = TransformerConfig(**{**PRESETS["tiny"], **kw})
    with pytest.raises(ValueError, match=None) as e:
        cfg.validate(tp_size=tp)
    assert needle in str(e.value)


def test_fp8_without_transformer_engine_builds_torch_native_fp8_linears():
    """fp8_format with transformer_impl='local' is the torch-native FP8 path (model/fp8.py): every
    decoder linear (qkv, proj, fc1, fc2 per layer) gets an FP8 state; the output layer does not."""
    from megatron_diffu.model.builder import build_model_shard

    cfg = TransformerConfig(**{**PRESETS["tiny"], "fp8_format": "hybrid"}).validate()
    model = build_model_shard(cfg)
    states = [m for m in model.modules() if getattr(m, "fp8", None) is not None]
    assert len(states) == 4 * cfg.num_layers
    assert getattr(model.output_layer, "fp8", None) is None if hasattr(model, "output_layer") else True
    assert all(getattr(m, "fp8", None) is None for m in build_model_shard(TransformerConfig(**PRESETS["tiny"])).modules())


def test_validation_pp_and_unknown_fields():
    with pytest.raises(ValueError, match="exceeds num_layers"):
        tiny().validate(pp_size=3)
    with pytest.raises(ValueError, match="no field"):
        TransformerConfig.from_preset("tiny", hidden=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        TransformerConfig.from_preset("gpt5")


# ---------------------------------------------------------------- masks and heads
def test_mask_forms_agree_and_padding_rows_are_finite():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny()).eval()
    ids = torch.randint(0, 256, (2, 9))
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[0, :4] = 0
    a = pad.bool()
    four_d = a[:, None, :, None] & a[:, None, None, :]  # padded rows fully masked -> self
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out2 = model(ids, attention_mask=pad)
        out4 = model(ids, attention_mask=four_d, position_ids=pos)
        none = model(ids)
        ones = model(ids, attention_mask=torch.ones_like(pad))
    assert torch.isfinite(out2).all() and torch.isfinite(out4).all()
    torch.testing.assert_close(none, ones)
    m = build_attention_mask(pad, 2, 9)
    assert m.key_padding and tuple(m.allowed.shape) == (2, 1, 1, 9)  # compact: no [B, 1, S, S] mask
    assert m.allowed[0, 0, 0].tolist() == [False] * 4 + [True] * 5
    # logits whose (shifted) source hidden state is a real token: the pairwise rule exactly (the
    # same kernel adds the same 0 / -inf terms); padded rows now see the real keys, not only
    # themselves, and nothing reads them
    src = torch.cat([a[:, :1], a[:, :-1]], dim=1)
    assert torch.equal(out2[src], out4[src])
    assert not torch.equal(out2[~src], out4[~src])


def test_causal_mask_is_respected():
    """A 4-D causal mask: logits at position i do not change when later tokens change."""
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny(logit_shift=False)).eval()
    ids = torch.randint(0, 256, (1, 8))
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    other = ids.clone()
    other[0, 5:] = (other[0, 5:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids, attention_mask=causal), model(other, attention_mask=causal)
        full_a, full_b = model(ids), model(other)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (full_a[:, :5] - full_b[:, :5]).abs().max() > 1e-4  # bidirectional by default


@pytest.mark.parametrize("shift", [True, False])
def test_logit_positions_select_shifted_rows(shift):
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny(logit_shift=shift)).eval()
    ids = torch.randint(0, 256, (3, 7))
    pos = torch.rand(3, 7) < 0.4
    pos[0, 0] = pos[2, 6] = True
    with torch.no_grad():
        full = model(ids)
        sel = model(ids, logit_positions=pos)
    torch.testing.assert_close(sel, full[pos])
    if shift:  # shifted: target n is predicted from hidden n-1 = unshifted logits at n-1
        model.cfg.logit_shift = False
        with torch.no_grad():
            raw = model(ids)
        torch.testing.assert_close(full[:, 1:], raw[:, :-1])
        torch.testing.assert_close(full[:, 0], raw[:, 0])


# ---------------------------------------------------------------- recompute
@pytest.mark.parametrize("granularity,num", [("full", None), ("full", 1), ("selective", None)])
def test_recompute_gives_identical_gradients(granularity, num):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 8))
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, :2] = 0
    grads = []
    for g in (None, granularity):
        model = DiffusionTransformer(tiny(recompute_granularity=g, recompute_num_layers=num)).train()
        F.cross_entropy(model(ids, attention_mask=pad)[1:].reshape(-1, 256), ids[1:].reshape(-1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=0, rtol=0, msg=n)


# ---------------------------------------------------------------- prefix KV cache
def test_prefix_kv_equals_full_call():
    """Prefix cached, then the suffix with prefix_kv, equals one full call in which the prefix
    attends only to itself and the suffix attends to everything (with left padding)."""
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny(logit_shift=False)).eval()
    P, S = 6, 5
    ids = torch.randint(0, 256, (2, P + S))
    pad = torch.ones(2, P + S, dtype=torch.long)
    pad[1, :2] = 0
    a = pad.bool()
    allowed = a[:, None, :, None] & a[:, None, None, :]
    allowed[:, :, :P, P:] = False  # prefix queries do not see the suffix
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=allowed, position_ids=pos)
        _, kv = model(ids[:, :P], attention_mask=pad[:, :P], return_kv=True)
        suffix = model(ids[:, P:], attention_mask=pad, prefix_kv=kv)
        _, kv_full = model(ids, attention_mask=allowed, position_ids=pos, return_kv=True)
    assert len(kv) == 2 and kv[0][0].shape == (2, 2, P, 16)
    torch.testing.assert_close(suffix, full[:, P:], atol=1e-5, rtol=1e-5)
    # the cache of real positions (layer 1's K depends on layer 0's outputs; padded positions'
    # cache is never read: every query's mask hides padded keys)
    real = a[:, :P]
    torch.testing.assert_close(kv[1][0].transpose(1, 2)[real], kv_full[1][0][:, :, :P].transpose(1, 2)[real],
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- weights
def test_state_dict_round_trip_and_seeded_init():
    cfg_a, cfg_b = tiny(seed=1), tiny(seed=2)
    a, b, a2 = DiffusionTransformer(cfg_a), DiffusionTransformer(cfg_b), DiffusionTransformer(tiny(seed=1))
    for (n, p), (_, q) in zip(a.named_parameters(), a2.named_parameters()):
        assert torch.equal(p, q), n  # same seed -> same weights
    sd = a.sharded_state_dict()
    shapes = global_parameter_shapes(cfg_a)
    assert {n: tuple(t.shape) for n, (t, _) in sd.items()} == shapes
    assert sd["decoder.layers.0.self_attention.linear_qkv.weight"][1] == 0
    assert sd["decoder.layers.1.mlp.linear_fc1.weight"][1] == 1
    assert sd["decoder.layers.1.self_attention.linear_proj.weight"][1] == 1
    assert sd["decoder.final_layernorm.weight"][1] is None
    ids = torch.randint(0, 256, (1, 6))
    assert not torch.allclose(a(ids), b(ids))
    b.load_global_state_dict({n: t.clone() for n, (t, _) in sd.items()})
    torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)
    std = a.decoder.layers["0"].self_attention.linear_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 2e-3  # Megatron's scaled init of output projections
    with pytest.raises(KeyError, match="missing"):
        b.load_global_state_dict({})
    bad = {n: t for n, (t, _) in sd.items()}
    bad["decoder.final_layernorm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="decoder.final_layernorm.weight: checkpoint shape"):
        b.load_global_state_dict(bad)


def test_pipeline_stages_compose_to_the_full_model():
    cfg = tiny(num_layers=3)
    assert [pipeline_layer_split(cfg, 2, r) for r in range(2)] == [[0, 1], [2]]
    assert [pipeline_layer_split(cfg, 2, r, split=[1, 2]) for r in range(2)] == [[0], [1, 2]]
    with pytest.raises(ValueError, match="summing to num_layers=3"):
        pipeline_layer_split(cfg, 2, 0, split=[1, 1])
    full = DiffusionTransformer(cfg).eval()
    first = DiffusionTransformer(cfg, post_process=False, layer_ids=[0]).eval()
    last = DiffusionTransformer(cfg, pre_process=False, layer_ids=[1, 2]).eval()
    assert first.stage_output_shape(2, 5) == (2, 5, 64)
    ids = torch.randint(0, 256, (2, 5))
    pad = torch.ones(2, 5, dtype=torch.long)
    pad[0, 0] = 0
    with torch.no_grad():
        h = first(ids, attention_mask=pad)
        torch.testing.assert_close(last(hidden_states=h, attention_mask=pad), full(ids, attention_mask=pad))
    assert "decoder.layers.2.mlp.linear_fc2.weight" in dict(last.named_parameters())
