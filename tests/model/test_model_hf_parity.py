"""Our fp32 model equals transformers' Qwen2ForCausalLM (same weights, full 4-D non-causal mask)."""
import pytest
import torch

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer

transformers = pytest.importorskip("transformers")


def to_hf_state_dict(model: DiffusionTransformer) -> dict:
    """Our canonical layout -> HF Qwen2 names (written independently of convert/hf.py)."""
    cfg = model.cfg
    g, r, d = cfg.num_kv_heads, cfg.num_attention_heads // cfg.num_kv_heads, cfg.head_dim
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = sd.get("output_layer.weight", sd["embedding.word_embeddings.weight"])
    for i in range(cfg.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[p + "self_attention.linear_qkv.weight"].view(g, r + 2, d, -1)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :r].reshape(g * r * d, -1)
        out[h + "self_attn.k_proj.weight"] = qkv[:, r].reshape(g * d, -1)
        out[h + "self_attn.v_proj.weight"] = qkv[:, r + 1].reshape(g * d, -1)
        bias = sd[p + "self_attention.linear_qkv.bias"].view(g, r + 2, d)
        out[h + "self_attn.q_proj.bias"] = bias[:, :r].reshape(-1)
        out[h + "self_attn.k_proj.bias"] = bias[:, r].reshape(-1)
        out[h + "self_attn.v_proj.bias"] = bias[:, r + 1].reshape(-1)
        out[h + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.weight"]
        fc1 = sd[p + "mlp.linear_fc1.weight"]
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = fc1[0], fc1[1]
        out[h + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.weight"]
        out[h + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "pre_mlp_layernorm.weight"]
    return out


def build_pair(**overrides):
    cfg = TransformerConfig.from_preset("tiny", init_method_std=0.1, **overrides)
    model = DiffusionTransformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base,
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights, attention_dropout=0.0)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return cfg, model, hf


def hf_logits(hf, ids, allowed, position_ids):
    """HF forward with our pairwise mask as an additive 4-D float mask (bypasses its causal mask)."""
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask={"full_attention": additive}, position_ids=position_ids).logits


def shift(logits):
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf_qwen2_bidirectional(tied):
    torch.manual_seed(0)
    cfg, model, hf = build_pair(untie_embeddings_and_output_weights=not tied)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    full = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    pos = torch.arange(12).unsqueeze(0).expand(2, 12)
    ref = hf_logits(hf, ids, full, pos)
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, shift(ref), atol=1e-5, rtol=1e-5)
    # the comparison is really non-causal: HF's default causal mask gives different logits
    with torch.no_grad():
        causal = hf(input_ids=ids).logits
    assert (shift(causal) - ours).abs().max() > 1e-2
    # no-shift mode returns the raw head
    model.cfg.logit_shift = False
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)


def test_left_padding_matches_hf_and_is_finite():
    torch.manual_seed(1)
    cfg, model, hf = build_pair()
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    pad = torch.ones(3, 10, dtype=torch.long)
    pad[1, :3] = 0
    pad[2, :6] = 0
    a = pad.bool()
    allowed = (a[:, None, :, None] & a[:, None, None, :]) | torch.eye(10, dtype=torch.bool)  # pad rows: self
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    ref = shift(hf_logits(hf, ids, allowed, pos))
    with torch.no_grad():
        ours = model(ids, attention_mask=pad)  # default position ids skip the padding
    assert torch.isfinite(ours).all()
    real = torch.zeros_like(a)
    real[:, 1:] = a[:, :-1] & a[:, 1:]  # shifted targets whose source hidden state is a real token
    real[0, 0] = True
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    # a padded row equals the same sequence without padding
    with torch.no_grad():
        alone = model(ids[1:2, 3:])
    torch.testing.assert_close(ours[1, 4:], alone[0, 1:], atol=1e-5, rtol=1e-5)
