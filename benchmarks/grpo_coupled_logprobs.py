"""Coupled-GRPO log-probs: our estimator vs the released code's way of computing the same numbers.

Both compute exactly the coupled estimate (docs/ALGORITHMS.md sec. 5) of the same batch with the same
masks, in one forward of the 3 copies:
- baseline (apple/ml-diffucoder `_get_per_token_logps` + `selective_log_softmax`): full logits of
  every position of every copy, log_softmax over the vocabulary, gather, combine;
- ours (`megatron_diffu.rl.coupled.estimate_log_probs`): the head computes logits only where a
  log-prob is used (all completion tokens of x_full, the masked ones of x_a / x_b: 2 rows per
  completion token instead of 3 * seq_len rows), vocab-parallel log-probs.

    python benchmarks/grpo_coupled_logprobs.py [--vocab 32000] [--batch 8] [--prompt 64] [--completion 192]

Prints a table (time per call forward-only and forward+backward, logit rows, logits memory) and
the ratio baseline / ours, and checks that both give the same estimate.
"""
from __future__ import annotations

import argparse
import time

import torch

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.rl.coupled import build_coupled_batch, estimate_log_probs


def baseline(model, tokens, maskable, idx, seed, mask_id):
    """Released-code style: full logits for all 3 copies, log_softmax everywhere, then combine."""
    b = build_coupled_batch(tokens, maskable, idx, seed, mask_id)
    logits = model(b.input_ids).float()  # [3B, S, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.repeat(3, 1)[..., None])[..., 0]
    full, a, bb = logp.view(3, *tokens.shape)
    t = b.noise.t[:, None]
    per = torch.where(b.noise.mask_a, a / t, bb / (1 - t))
    return torch.where(maskable, (full + per) / 2, torch.zeros_like(full)), logits.numel()


def ours(model, tokens, maskable, idx, seed, mask_id):
    lp, _ = estimate_log_probs(model, tokens, maskable, idx, seed, mask_id)
    return lp, 2 * int(maskable.sum()) * model.cfg.vocab_size


def timeit(fn, reps: int, backward: bool) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out, _ = fn()
            if backward:
                out.sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = TransformerConfig.from_preset("tiny", vocab_size=a.vocab, hidden_size=128, ffn_hidden_size=384)
    model = DiffusionTransformer(cfg)
    mask_id = a.vocab - 1
    s = a.prompt + a.completion
    tokens = torch.randint(0, mask_id, (a.batch, s), generator=torch.Generator().manual_seed(0))
    maskable = torch.zeros(a.batch, s, dtype=torch.bool)
    maskable[:, a.prompt:] = True
    idx = torch.arange(a.batch)
    with torch.no_grad():
        ref, n_base = baseline(model, tokens, maskable, idx, 1, mask_id)
        got, n_ours = ours(model, tokens, maskable, idx, 1, mask_id)
    err = (ref - got).abs().max().item()
    rows = []
    for name, fn, n in (("baseline (released code)", baseline, n_base), ("ours (logit_positions)", ours, n_ours)):
        f = lambda fn=fn: fn(model, tokens, maskable, idx, 1, mask_id)  # noqa: E731
        rows.append((name, timeit(f, a.reps, False), timeit(f, a.reps, True), n // a.vocab, n * 4 / 2**20))
        model.zero_grad(set_to_none=True)
    print(f"coupled log-probs: batch {a.batch} x (prompt {a.prompt} + completion {a.completion}), vocab {a.vocab}, "
          f"tiny model hidden 128, {a.threads} thread(s); max |diff| = {err:.2e}")
    print(f"{'method':<26}{'fwd (s)':>10}{'fwd+bwd (s)':>13}{'logit rows':>12}{'fp32 logits (MiB)':>19}")
    for r in rows:
        print(f"{r[0]:<26}{r[1]:>10.3f}{r[2]:>13.3f}{r[3]:>12d}{r[4]:>19.1f}")
    print(f"{'ratio baseline / ours':<26}{rows[0][1] / rows[1][1]:>10.2f}{rows[0][2] / rows[1][2]:>13.2f}"
          f"{rows[0][3] / rows[1][3]:>12.2f}{rows[0][4] / rows[1][4]:>19.2f}")


if __name__ == "__main__":
    main()
