"""The coupled per-token log-prob estimator (docs/ALGORITHMS.md sec. 5) against a plain computation.

The reference in this file draws t and R from the documented keys itself, builds x_full / x_a /
x_b by hand, runs the model once per copy with *full* logits (no logit_positions), takes torch's
log_softmax over the whole vocabulary and applies the formula token by token in Python.
"""
import torch

from megatron_diffu.diffusion.objective import keyed_generator
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.rl.coupled import build_coupled_batch, draw_noise, estimate_log_probs

MASK = 255  # last id of the tiny preset's 256-entry vocabulary
B, S = 3, 14
PROMPT_LEN = [5, 7, 4]


def tiny_model(seed=3):
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", seed=seed)
    return DiffusionTransformer(cfg).eval()


def make_batch():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, MASK, (B, S), generator=g)
    maskable = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(PROMPT_LEN):
        maskable[b, p:] = True
    return tokens, maskable, torch.tensor([40, 41, 97])


def plain_coupled(model, tokens, maskable, sample_index, mask_seed, t_min=0.2, t_max=0.8, p_prompt=0.0):
    """The formula, written out: one t per mask seed, one R per (mask seed, sample, position); with
    p_prompt > 0 each prompt token is masked in all three copies where its own uniform R' < p_prompt."""
    u = torch.rand((), generator=keyed_generator(mask_seed, -1, "coupled_t")).item()
    t = t_min + (t_max - t_min) * u
    out = torch.zeros(B, S)
    for b in range(B):
        r = torch.rand(S, generator=keyed_generator(mask_seed, int(sample_index[b]), "coupled_r"))
        r_prompt = torch.rand(S, generator=keyed_generator(mask_seed, int(sample_index[b]), "coupled_prompt"))
        x_full, x_a, x_b = tokens[b].clone(), tokens[b].clone(), tokens[b].clone()
        for n in range(S):
            if not maskable[b, n] and r_prompt[n] < p_prompt:
                x_full[n] = x_a[n] = x_b[n] = MASK
            if maskable[b, n]:
                x_full[n] = MASK
                if r[n] < t:
                    x_a[n] = MASK
                else:
                    x_b[n] = MASK
        with torch.no_grad():
            lp = {name: torch.log_softmax(model(x[None]).float()[0], dim=-1) for name, x in
                  (("full", x_full), ("a", x_a), ("b", x_b))}
        for n in range(S):
            if not maskable[b, n]:
                continue
            o = tokens[b, n]
            term = lp["a"][n, o] / t if r[n] < t else lp["b"][n, o] / (1 - t)
            out[b, n] = (lp["full"][n, o] + term) / 2
    return out


def test_coupled_equals_plain_formula_for_fixed_seeds():
    model = tiny_model()
    tokens, maskable, idx = make_batch()
    for mask_seed in (0, 12345):
        with torch.no_grad():
            got, _ = estimate_log_probs(model, tokens, maskable, idx, mask_seed, MASK)
        want = plain_coupled(model, tokens, maskable, idx, mask_seed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got[~maskable] == 0).all()


def test_coupled_prompt_masking_masks_the_prompt_alike_in_every_copy():
    """coupled_p_mask_prompt (a deviation from DiffuCoder) against the plain formula; d1's
    p_mask_prompt leaves the coupled estimate alone, and p = 0 is DiffuCoder's estimate."""
    model = tiny_model()
    tokens, maskable, idx = make_batch()
    with torch.no_grad():
        masked, _ = estimate_log_probs(model, tokens, maskable, idx, 5, MASK, coupled_p_mask_prompt=0.5)
        d1_option_only, _ = estimate_log_probs(model, tokens, maskable, idx, 5, MASK, p_mask_prompt=0.9)
    torch.testing.assert_close(masked, plain_coupled(model, tokens, maskable, idx, 5, p_prompt=0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d1_option_only, plain_coupled(model, tokens, maskable, idx, 5), rtol=1e-5, atol=1e-5)
    batch = build_coupled_batch(tokens, maskable, idx, 5, MASK, coupled_p_mask_prompt=0.5)
    copies = (batch.input_ids.view(3, B, S) == MASK) & ~maskable
    assert copies[0].any() and torch.equal(copies[0], copies[1]) and torch.equal(copies[0], copies[2])
    assert batch.targets.numel() == 2 * int(maskable.sum())  # log-probs of the completion only


def test_chunking_and_per_sample_keys_do_not_change_the_estimate():
    model = tiny_model()
    tokens, maskable, idx = make_batch()
    with torch.no_grad():
        whole, _ = estimate_log_probs(model, tokens, maskable, idx, 7, MASK)
        chunked, _ = estimate_log_probs(model, tokens, maskable, idx, 7, MASK, chunk_size=1)
        # a row's estimate depends on its sample index, not on its neighbours or its position
        alone, _ = estimate_log_probs(model, tokens[2:], maskable[2:], idx[2:], 7, MASK)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], whole[2], rtol=1e-5, atol=1e-6)


def test_every_completion_token_masked_in_exactly_one_of_a_b_and_prompt_never():
    g = torch.Generator().manual_seed(0)
    for seed in range(200):
        maskable = torch.rand(4, 33, generator=g) < 0.7
        idx = torch.randint(0, 10**6, (4,), generator=g)
        noise = draw_noise(maskable, idx, seed, per_sequence_t=bool(seed % 2))
        assert torch.equal(noise.mask_a ^ noise.mask_b, maskable)
        assert not (noise.mask_a & noise.mask_b).any()
        assert ((noise.t >= 0.2) & (noise.t <= 0.8)).all()
    tokens, maskable, idx = make_batch()
    batch = build_coupled_batch(tokens, maskable, idx, 3, MASK)
    copies = batch.input_ids.view(3, B, S)
    for c in range(3):  # the prompt is clean in every copy
        assert torch.equal(copies[c][~maskable], tokens[~maskable])
    assert (copies[0][maskable] == MASK).all()
    # two logit rows per completion token (all of x_full, + the masked one of x_a / x_b): not three
    assert batch.targets.numel() == 2 * int(maskable.sum())


def test_coupled_variance_is_lower_than_single_random_mask():
    """Same model, same tokens, 24 mask seeds: the per-sequence sum of the estimates varies less
    with the complementary pair than with one random mask of the same expectation."""
    model = tiny_model(seed=5)
    tokens, maskable, idx = make_batch()
    est = {"coupled": [], "single": []}
    with torch.no_grad():
        for seed in range(24):
            for name in est:
                lp, _ = estimate_log_probs(model, tokens, maskable, idx, 1000 + seed, MASK, estimator=name)
                est[name].append(lp.sum(dim=1))
    var = {k: torch.stack(v).var(dim=0) for k, v in est.items()}
    print({k: v.tolist() for k, v in var.items()})
    assert (var["coupled"] * 4 < var["single"]).all(), var
    # and they estimate the same thing: the means agree within a few standard errors
    mean = {k: torch.stack(v).mean(dim=0) for k, v in est.items()}
    se = (var["single"] / 24).sqrt() + (var["coupled"] / 24).sqrt()
    assert ((mean["coupled"] - mean["single"]).abs() < 4 * se).all()


def test_d1_estimator_is_one_fully_masked_pass():
    model = tiny_model()
    tokens, maskable, idx = make_batch()
    with torch.no_grad():
        got, ent = estimate_log_probs(model, tokens, maskable, idx, 0, MASK, estimator="d1", p_mask_prompt=0.0,
                                      return_entropy=True)
        x = torch.where(maskable, torch.full_like(tokens, MASK), tokens)
        logits = model(x).float()
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        p = torch.softmax(logits, -1)
        want_ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(got, torch.where(maskable, lp, torch.zeros_like(lp)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[maskable], want_ent[maskable], rtol=1e-4, atol=1e-5)
    # with prompt masking, prompt positions (and only those) get masked, keyed by the seed
    b1 = build_coupled_batch(tokens, maskable, idx, 9, MASK, estimator="d1", p_mask_prompt=0.5)
    b2 = build_coupled_batch(tokens, maskable, idx, 9, MASK, estimator="d1", p_mask_prompt=0.5)
    assert torch.equal(b1.input_ids, b2.input_ids)
    masked_prompt = (b1.input_ids == MASK) & ~maskable
    assert masked_prompt.any() and not torch.equal(masked_prompt, ~maskable)
