"""The sampler equals a plain, one-prompt-at-a-time reference of docs/ALGORITHMS.md sec. 4.

`reference_generate` below is written from the spec (Dream `diffusion_generate`), independently
of `megatron_diffu.diffusion.sampling`: one prompt, one full forward per step, Python loops. It
shares only the documented randomness contract with the sampler: prompt b owns a generator
seeded by ``row_seed(seed, b)`` and draws, per step, the transfer coins (origin) / the token
samples (T > 0: one fp64 uniform each, inverse CDF) / the position samples (alg_temp > 0) in
that order.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate, row_seed
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer

VOCAB, MASK, PAD, EOS = 128, 127, 126, 125
PROMPTS = [[5, 17, 42, 9, 33], [7, 8], [60, 61, 62, 63, 64, 65, 66, 1]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread is faster than two fighting over a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 3, sharpen: float = 20.0, grid=None) -> DiffusionTransformer:
    """Random tiny Qwen-style model; the head is scaled so distributions are peaked (no near-ties)."""
    cfg = TransformerConfig.from_preset("tiny", vocab_size=VOCAB, seed=seed)
    model = DiffusionTransformer(cfg, grid=grid).eval()
    with torch.no_grad():
        model.output_layer.weight.mul_(sharpen)
    return model


# ----------------------------------------------------------------------------- the reference
def ref_probs(logits_row: torch.Tensor, temperature, top_p, top_k) -> torch.Tensor:
    """Temperature, then top-p (keep the sorted tokens whose preceding mass is <= top_p), then top-k."""
    z = logits_row.float().clone()
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        vals, order = torch.sort(z, descending=True)
        mass = torch.cumsum(torch.softmax(vals, -1), -1)
        drop = torch.zeros(z.numel(), dtype=torch.bool)
        drop[1:] = mass[:-1] > top_p  # token j goes when the tokens before it already hold top_p
        z[order[drop]] = -math.inf
    if top_k is not None:
        kth = sorted(z.tolist(), reverse=True)[min(top_k, z.numel()) - 1]
        z[z < kth] = -math.inf
    return torch.softmax(z, -1)


def ref_token(logits_row, cfg: SamplingConfig, gen):
    p = ref_probs(logits_row, cfg.temperature, cfg.top_p, cfg.top_k)
    if cfg.temperature > 0:  # inverse CDF: the first token whose running mass exceeds u * total
        u = float(torch.rand(1, 1, generator=gen, dtype=torch.float64))
        masses = p.double().tolist()
        target, acc, tok = u * sum(masses), 0.0, len(masses) - 1
        for i, m in enumerate(masses):
            acc += m
            if acc > target:
                tok = i
                break
    else:
        tok = int(p.argmax())
    p_tok = conf = float(p[tok])
    if cfg.alg == "topk_margin":
        s = sorted(p.tolist(), reverse=True)
        conf = s[0] - s[1]
    elif cfg.alg == "entropy":
        conf = float((p * torch.log(p + 1e-10)).sum())
    return tok, conf, p_tok


def reference_generate(model, prompt: list[int], cfg: SamplingConfig, gen: torch.Generator):
    """One prompt: returns (new tokens, reveal step per new token)."""
    N, P = cfg.max_new_tokens, len(prompt)
    x = torch.tensor([prompt + [MASK] * N])
    reveal = [-1] * N
    block = cfg.block_length or N
    n_blocks = N // block
    steps_per_block = cfg.steps // n_blocks
    if cfg.threshold is not None and cfg.threshold_rule == "fast_dllm":
        steps_per_block = block  # Fast-dLLM loops until the block has no masks (>= 1 token a step)
    step = 0
    for blk in range(n_blocks):
        lo, hi = P + blk * block, P + (blk + 1) * block
        taus = torch.linspace(1, cfg.eps, steps_per_block + 1)
        for i in range(steps_per_block):
            masked = [j for j in range(lo, hi) if int(x[0, j]) == MASK]
            if not masked:
                break
            with torch.no_grad():
                logits = model(x)[0]  # the model applies the shift itself
            t, s = taus[i], taus[i + 1]
            last = i == steps_per_block - 1
            chosen: dict[int, int] = {}
            if cfg.alg == "origin":
                p_move = 1.0 if last else float(1 - s / t)
                coins = torch.rand(len(masked), generator=gen)
                for j, pos in enumerate(masked):
                    if coins[j] < p_move:
                        chosen[pos] = None
                for pos in chosen:
                    chosen[pos] = ref_token(logits[pos], cfg, gen)[0]
            else:
                toks, confs, p_toks = zip(*[ref_token(logits[pos], cfg, gen) for pos in masked])
                if cfg.threshold is not None and cfg.threshold_rule == "fast_dllm":
                    # Fast-dLLM get_transfer_index: sort by the drawn token's probability, keep the
                    # first, drop every other one whose probability is below the threshold
                    best = max(range(len(masked)), key=lambda j: p_toks[j])
                    pick = [j for j in range(len(masked)) if last or p_toks[j] >= cfg.threshold or j == best]
                elif cfg.threshold is not None:  # the earlier rule: > threshold, plus the best alg confidence
                    best = max(range(len(masked)), key=lambda j: confs[j])
                    pick = [j for j in range(len(masked)) if last or p_toks[j] > cfg.threshold or j == best]
                else:
                    k = len(masked) if last else int(torch.tensor(float(len(masked))) * (1 - s / t))
                    c = torch.tensor(confs)
                    if k <= 0:
                        pick = []
                    elif cfg.alg_temp:
                        pick = torch.multinomial(torch.softmax(c / cfg.alg_temp, -1), k, generator=gen).tolist()
                    else:
                        pick = torch.topk(c, k).indices.tolist()
                for j in pick:
                    chosen[masked[j]] = toks[j]
            for pos, tok in chosen.items():
                x[0, pos] = tok
                if tok != MASK:
                    reveal[pos - P] = step
            step += 1
    return x[0, P:].tolist(), reveal


def check_equal(model, cfg: SamplingConfig, prompts=PROMPTS):
    for b, prompt in enumerate(prompts):
        out = diffusion_generate(model, [prompt], cfg, mask_id=MASK, pad_id=PAD, sample_index=[b])
        ref_tokens, ref_reveal = reference_generate(model, prompt, cfg,
                                                    torch.Generator().manual_seed(row_seed(cfg.seed, b)))
        assert out.sequences[0, len(prompt):].tolist() == ref_tokens, (cfg, b)
        assert out.reveal_step[0].tolist() == ref_reveal, (cfg, b)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


# ----------------------------------------------------------------------------- equality with the reference
@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_greedy_equals_reference(model, alg):
    check_equal(model, SamplingConfig(max_new_tokens=12, steps=6, temperature=0.0, alg=alg))


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_sampled_equals_reference(model, alg):
    check_equal(model, SamplingConfig(max_new_tokens=12, steps=5, temperature=0.8, top_p=0.9, top_k=20,
                                      alg=alg, seed=11))


def test_alg_temp_and_blocks_equal_reference(model):
    check_equal(model, SamplingConfig(max_new_tokens=12, steps=8, temperature=1.0, alg="entropy",
                                      alg_temp=0.5, seed=5))
    check_equal(model, SamplingConfig(max_new_tokens=12, steps=6, temperature=0.0, alg="maskgit_plus",
                                      block_length=4))
    check_equal(model, SamplingConfig(max_new_tokens=8, steps=8, temperature=0.0, alg="topk_margin"))


@pytest.mark.parametrize("rule", ["fast_dllm", "alg_confidence"])
def test_threshold_above_one_is_one_token_per_step(model, rule):
    cfg = SamplingConfig(max_new_tokens=10, steps=10, temperature=0.0, alg="maskgit_plus", threshold=1.5,
                         threshold_rule=rule)
    check_equal(model, cfg)
    out = diffusion_generate(model, [PROMPTS[0]], cfg, mask_id=MASK, pad_id=PAD)
    assert sorted(out.reveal_step[0].tolist()) == list(range(10))  # exactly one new token per step
    assert out.nfe == 10


@pytest.mark.parametrize("rule", ["fast_dllm", "alg_confidence"])
def test_threshold_parallel_equals_reference(model, rule):
    cfg = SamplingConfig(max_new_tokens=12, steps=12, temperature=0.0, alg="maskgit_plus", threshold=0.3,
                         block_length=6, threshold_rule=rule)
    check_equal(model, cfg)
    check_equal(model, SamplingConfig(max_new_tokens=12, steps=12, temperature=0.0, alg="entropy", threshold=0.6,
                                      threshold_rule=rule))
    check_equal(model, SamplingConfig(max_new_tokens=12, steps=12, temperature=0.9, alg="topk_margin", threshold=0.2,
                                      threshold_rule=rule, seed=4))
    out = diffusion_generate(model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD)
    assert out.nfe < 12  # several tokens per step somewhere: fewer forwards than tokens


def test_fast_dllm_threshold_is_the_default_and_ignores_steps(model):
    """Fast-dLLM's threshold decoding loops until the block is full: with steps = 2 and a threshold
    above 1 it still reveals one token per step, 12 forwards for 12 tokens (the earlier rule
    stops after the 2 allotted steps and reveals the rest at the second)."""
    assert SamplingConfig().threshold_rule == "fast_dllm"
    fast = SamplingConfig(max_new_tokens=12, steps=2, temperature=0.0, alg="entropy", threshold=1.5)
    check_equal(model, fast)
    assert diffusion_generate(model, [PROMPTS[0]], fast, mask_id=MASK, pad_id=PAD).nfe == 12
    old = SamplingConfig(max_new_tokens=12, steps=2, temperature=0.0, alg="entropy", threshold=1.5,
                         threshold_rule="alg_confidence")
    assert diffusion_generate(model, [PROMPTS[0]], old, mask_id=MASK, pad_id=PAD).nfe == 2
    with pytest.raises(ValueError, match="threshold_rule"):
        SamplingConfig(threshold_rule="nope").validate()


# ----------------------------------------------------------------------------- batching and bookkeeping
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_left_padded_batch_equals_each_prompt_alone(model, temperature):
    cfg = SamplingConfig(max_new_tokens=10, steps=5, temperature=temperature, top_p=0.95, alg="entropy", seed=2)
    batch = diffusion_generate(model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD)
    P = max(map(len, PROMPTS))
    assert batch.prompt_length == P
    for b, prompt in enumerate(PROMPTS):
        alone = diffusion_generate(model, [prompt], cfg, mask_id=MASK, pad_id=PAD, sample_index=[b])
        assert batch.sequences[b, P:].tolist() == alone.sequences[0, len(prompt):].tolist()
        assert batch.sequences[b, P - len(prompt):P].tolist() == prompt
        assert batch.reveal_step[b].tolist() == alone.reveal_step[0].tolist()


def test_stop_ids_history_and_hooks(model):
    cfg = SamplingConfig(max_new_tokens=8, steps=4, temperature=0.0, alg="maskgit_plus")
    forced = {}

    def tokens_hook(step, x, logits):  # plant an EOS in row 0 after the first step
        if step == 0:
            x = x.clone()
            x[0, -5] = EOS
            forced["seen"] = True
        return x

    out = diffusion_generate(model, PROMPTS[:2], cfg, mask_id=MASK, pad_id=PAD, stop_ids=(EOS,),
                             output_history=True, tokens_hook=tokens_hook)
    assert forced["seen"]
    new = out.sequences[0, out.prompt_length:].tolist()
    assert out.completions[0] == new[:new.index(EOS)]
    assert len(out.history) == 4 and torch.equal(out.history[-1], out.sequences)
    assert (out.reveal_step >= 0).all() and out.reveal_step.max() == 3
    # logits hook: banning every token but 3 forces all-3 completions
    def only3(step, x, logits):
        logits = logits.clone()
        keep = logits[..., 3].clone()
        logits[...] = -1e4
        logits[..., 3] = keep
        return logits
    out = diffusion_generate(model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD, logits_hook=only3)
    assert (out.sequences[:, out.prompt_length:] == 3).all()


def test_bad_config_errors_name_the_field():
    with pytest.raises(ValueError, match="alg="):
        SamplingConfig(alg="greedy").validate()
    with pytest.raises(ValueError, match="block_length=5"):
        SamplingConfig(max_new_tokens=12, block_length=5).validate()
    with pytest.raises(ValueError, match="steps=7"):
        SamplingConfig(max_new_tokens=12, steps=7, block_length=4).validate()
    with pytest.raises(ValueError, match="threshold"):
        SamplingConfig(alg="origin", threshold=0.9).validate()


def test_top_p_candidate_path_equals_the_full_sort():
    """Rows whose nucleus fits in TOP_P_CANDIDATES[0] take `topk` instead of a full sort: the kept set
    equals the spec's sort-cumsum-cut (Dream's `top_p_logits`), except where the crossing token's
    cumulative mass is within float rounding of top_p (the two normalise in another order)."""
    from megatron_diffu.diffusion import sampling as S

    def spec(logits, top_p):
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), torch.finfo(logits.dtype).min), cum

    vocab = 4 * S.TOP_P_CANDIDATES[0]
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 3.0, 6.0, 10.0, 30.0]).repeat_interleave(8)[:, None]  # flat .. peaked rows
    logits = torch.randn(len(scales), vocab, generator=g) * scales
    fast_rows = 0
    for top_p in (0.5, 0.9, 0.95):
        got = S.top_p_filter(logits, top_p)
        want, cum = spec(logits, top_p)
        near_boundary = ((cum - top_p).abs() < 1e-5).any(-1)
        same = (got == want).all(-1)
        assert bool((same | near_boundary).all()), f"top_p={top_p}: rows {(~same).nonzero().flatten().tolist()} differ"
        assert int(same.sum()) >= len(scales) - 1
        fast_rows += int(((want > torch.finfo(want.dtype).min).sum(-1) <= S.TOP_P_CANDIDATES[0]).sum())
    assert fast_rows > 0 and fast_rows < 3 * len(scales)  # both paths exercised


def test_inverse_cdf_token_draws_follow_the_probabilities():
    """`sample_tokens` draws from the categorical distribution (frequencies within 5 sigma over
    200k draws), never a zero-probability token, and accepts unnormalised rows."""
    from megatron_diffu.diffusion.sampling import sample_tokens

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    n = 200_000
    draws = sample_tokens(probs.expand(n, -1) * 3.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=probs.numel()).double() / n
    assert freq[probs == 0].sum() == 0
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert bool(((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all()), freq
