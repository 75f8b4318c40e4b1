"""Logits parity and generation parity across the conversion (issue 6).

Three independent implementations must agree, in fp32 and in fp64, to the rounding bound of two
summation orders (`rounding_bound`: K u max|logit|, K the accumulation depth):
  * transformers' Qwen2ForCausalLM with a full (bidirectional) attention mask (the reference),
  * our DiffusionTransformer loaded from the converted native checkpoint,
  * the exported folder loaded with AutoModel.from_pretrained(path, trust_remote_code=True).
The exported model's `diffusion_generate` must give our sampler's tokens at temperature 0.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_convert_roundtrip import make_tiny_qwen2, read_hf

from megatron_diffu.convert.checkpoint import hf_to_native, native_to_hf
from megatron_diffu.convert.verify import load_native_model

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
MASK_ID, PAD_ID = 95, 94  # tiny vocabulary (96): the last two ids play <|mask|> and padding


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    src = make_tiny_qwen2(tmp / "hf", std=0.5)
    hf_to_native(src, tmp / "native", tp=2, progress=False)
    native_to_hf(tmp / "native", tmp / "export", max_shard_size="40KB", progress=False,
                 token_ids={"mask_token_id": MASK_ID, "pad_token_id": PAD_ID})
    return tmp


@pytest.fixture(scope="module")
def models(converted):
    """(exported AutoModel with trust_remote_code, our native model): loaded once for the module."""
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(converted / "export", trust_remote_code=True, dtype=torch.float32).eval()
    return exported, load_native_model(converted / "native")


def rounding_bound(cfg, seq_length: int, logits: torch.Tensor) -> float:
    """Worst-case |a - b| between two implementations of the same forward in logits.dtype that differ
    only in summation order (fused vs split projections, kernels picked per ISA: AVX2 / AVX-512):
    a length-n reduction is off by at most n u of its magnitude (u = the unit roundoff, 2^-24 in
    fp32, 2^-53 in fp64), and a logit chains, per layer, qkv (H), scores (D), softmax and AV (S
    each), proj (Q*D), fc1 (H) and fc2 (F), then the head (H): K u max|logit| with K the sum, the
    accumulation depth (736 for the 4-layer tiny Qwen2 here: fp32 bound 6e-8 * 736 * ~11 = 5e-4,
    measured 1.2e-5 on AVX-512; fp64 bound ~1e-12, measured 0)."""
    d = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    per_layer = (cfg.hidden_size + d + 2 * seq_length + cfg.num_attention_heads * d + cfg.hidden_size
                 + cfg.ffn_hidden_size)
    depth = cfg.num_layers * per_layer + cfg.hidden_size
    return depth * torch.finfo(logits.dtype).eps / 2 * float(logits.abs().max())


def _shift(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_parity_native_vs_transformers_qwen2_vs_exported(converted, models, dtype):
    """In fp32 within the rounding bound of two fp32 summation orders (~5e-4 here; measured 8e-6
    on AVX-512), and in fp64, where the same bound is ~1e-12: any difference beyond rounding (a
    weight, RoPE, a norm epsilon) shows there."""
    import copy

    from transformers import Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM.from_pretrained(converted / "hf", dtype=dtype).eval()
    exported, native = models
    assert type(exported).__name__ == "DreamModel" and exported.config.rope_theta == 1e6
    if dtype != torch.float32:
        exported, native = copy.deepcopy(exported).to(dtype), copy.deepcopy(native).to(dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 94, (3, 20), generator=gen)
    pad = torch.ones(3, 20, dtype=torch.long)
    pad[2, :5] = 0  # left padding in the last row
    pairwise = (pad.bool()[:, None, :, None] & pad.bool()[:, None, None, :])
    ref = _shift(qwen(ids, attention_mask={"full_attention": pairwise}).logits)
    ref_pos = (pad.cumsum(-1) - 1).clamp(min=0)
    ref_pos_logits = _shift(qwen(ids, attention_mask={"full_attention": pairwise}, position_ids=ref_pos).logits)
    ours = native(ids, attention_mask=pad)
    exp = _shift(exported(ids, attention_mask=pad).logits)
    assert ref.dtype == ours.dtype == exp.dtype == dtype
    tol = rounding_bound(native.cfg, ids.shape[1], ref)
    real = pad.bool().clone()
    real[2, 5] = False  # predicted from a padding position's hidden state: undefined on every side
    # full rows (no padding): default positions everywhere
    assert (ours[:2] - ref[:2]).abs().max() <= tol
    assert (exp[:2] - ref[:2]).abs().max() <= tol
    # padded row: positions skip the padding (cumsum - 1) on our side; the reference gets them explicitly
    assert (ours[2][real[2]] - ref_pos_logits[2][real[2]]).abs().max() <= tol
    assert (exp[2][real[2]] - ref_pos_logits[2][real[2]]).abs().max() <= tol
    assert (ours - exp)[real].abs().max() <= tol


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_exported_diffusion_generate_matches_our_sampler(models, alg):
    from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate

    exported, native = models
    assert exported.config.mask_token_id == MASK_ID
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    cfg = SamplingConfig(max_new_tokens=12, steps=6, alg=alg, temperature=0.0)
    ours = diffusion_generate(native, prompts, cfg, mask_id=MASK_ID, pad_id=PAD_ID, output_history=True)
    out = exported.diffusion_generate(torch.tensor(prompts), max_new_tokens=12, steps=6, alg=alg, temperature=0.0,
                                      output_history=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ours.sequences)
    assert len(out.history) == 6 and all(torch.equal(a, b) for a, b in zip(out.history, ours.history))
    assert not (out.sequences == MASK_ID).any()


def test_exported_diffusion_generate_left_padded_batch(models):
    from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate

    exported, native = models
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22]]
    cfg = SamplingConfig(max_new_tokens=8, steps=4, alg="maskgit_plus", temperature=0.0)
    ours = diffusion_generate(native, prompts, cfg, mask_id=MASK_ID, pad_id=PAD_ID)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [PAD_ID] * 3 + [20, 21, 22]])
    attn = (ids != PAD_ID).long()
    seq = exported.diffusion_generate(ids, attention_mask=attn, max_new_tokens=8, steps=4, alg="maskgit_plus",
                                      temperature=0.0)
    assert torch.equal(seq, ours.sequences)


def test_autoregressive_import_adds_dream_mask_token_with_mean_rows(tmp_path):
    """A Qwen2 source with the Qwen tokenizer: <|mask|> = 151666 etc. added, rows = mean embedding."""
    from megatron_diffu.convert.native_io import NativeCheckpoint
    from megatron_diffu.convert.synthetic import qwen2_config, write_random_hf_checkpoint
    from megatron_diffu.data.tokenizer import build_tokenizer, qwen_tokenizer_path

    import shutil
    src = write_random_hf_checkpoint(tmp_path / "hf", qwen2_config(1, 16, 32, 2, 1, 151936, dtype="float32"))
    shutil.copy(qwen_tokenizer_path(), src / "tokenizer.json")
    hf_to_native(src, tmp_path / "native", progress=False)
    report = json.loads((tmp_path / "native" / "iter_0000000" / "conversion_report.json").read_text())
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "native" / "tokenizer" / "tokenizer.json"))
    assert tok.mask_id == 151666 and report["special_tokens"]["mask_token_id"] == 151666
    new = report["vocab"]["new_ids"]
    assert {151665, 151666, 151667} <= set(new) and min(new) == 151665
    hf = read_hf(src)
    ck = NativeCheckpoint(tmp_path / "native")
    got = ck.load(["embedding.word_embeddings.weight", "output_layer.weight"])
    for native_name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                                 ("output_layer.weight", "lm_head.weight")):
        w, ref = got[native_name], hf[hf_name]
        mean = ref[:151665].mean(dim=0)
        assert torch.allclose(w[new], mean.expand(len(new), -1), atol=1e-7, rtol=0)
        keep = torch.ones(ref.shape[0], dtype=torch.bool)
        keep[new] = False
        assert torch.equal(w[keep], ref[keep])  # every other row untouched
    export = native_to_hf(tmp_path / "native", tmp_path / "export", progress=False)
    cfg = json.loads((export / "config.json").read_text())
    assert (cfg["mask_token_id"], cfg["eos_token_id"], cfg["rope_theta"]) == (151666, 151643, 1e6)
    added = {t["content"]: t["id"] for t in json.loads((export / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|mask|>"] == 151666 and added["<|endoftext|>"] == 151643


@torch.no_grad()
def test_trainer_loader_reads_the_converted_checkpoint(converted, models):
    """training/checkpointing.load_inference_model (the trainer's DCP path) accepts our layout.

    Compared in fp32 (the dtype it loads in) against the rounding bound of two fp32 summation
    orders, and again in fp64, where the same bound is ~1e-12: any difference in the weights or
    the arithmetic (not only in rounding) shows there."""
    import copy

    from megatron_diffu.training.checkpointing import load_inference_model

    model, cfg = load_inference_model(converted / "native")
    assert cfg.vocab_size == 96 and cfg.rotary_base == 1e6
    exported, _ = models
    ids = torch.randint(0, 94, (2, 12), generator=torch.Generator().manual_seed(1))
    ours, ref = model(ids), _shift(exported(ids).logits)
    assert ours.dtype == ref.dtype == torch.float32
    assert (ours - ref).abs().max() <= rounding_bound(cfg, ids.shape[1], ref)
    ours64, ref64 = model.double()(ids), _shift(copy.deepcopy(exported).double()(ids).logits)
    assert ours64.dtype == ref64.dtype == torch.float64
    assert (ours64 - ref64).abs().max() <= rounding_bound(cfg, ids.shape[1], ref64)
    assert (ours64 - ours).abs().max() <= rounding_bound(cfg, ids.shape[1], ref)  # fp32 ~ fp64 too
