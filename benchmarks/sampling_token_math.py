#!/usr/bin/env python3
"""Per-step token math of T > 0 sampling on a real-sized vocabulary: top-p filter + token draw.

    python benchmarks/sampling_token_math.py [--rows 64] [--vocab 151680] [--top-p 0.95] [--threads 2]

Baseline = Dream's `_sample` token math written plainly: full `torch.sort` of every row for
top-p, softmax, `torch.multinomial` (which draws one exponential per vocabulary entry). Ours =
`megatron_diffu.diffusion.sampling`: `top_p_filter` (topk candidates, full sort only for rows
whose nucleus is larger than the last candidate count) and `sample_tokens` (inverse CDF, one
fp64 uniform per row). Rows are logits ~ N(0, scale^2): scale 0.1 is a flat (untrained) model,
larger scales are peaked like a trained one; the nucleus size is printed. `= base` / `= exact`:
fraction of rows whose kept set equals the fp32 baseline's / the nucleus computed in fp64 (the
baseline's fp32 prefix sums drift by ~1e-5 over thousands of tokens; ours sums in fp64).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_diffu.diffusion.sampling import sample_tokens, top_p_filter  # noqa: E402


def dream_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), torch.finfo(logits.dtype).min)


def exact_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus computed in fp64 (the yardstick for both fp32 baseline and ours)."""
    return dream_top_p(logits.double(), top_p).float().masked_fill(
        dream_top_p(logits.double(), top_p) == torch.finfo(torch.float64).min, torch.finfo(logits.dtype).min)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="masked positions sampled per step")
    ap.add_argument("--vocab", type=int, default=151680)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--scales", default="0.1,3,10,30")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"rows {args.rows} x vocab {args.vocab}, top_p {args.top_p}, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'scale':>6} {'nucleus':>9} | {'top-p base ms':>13} {'ours ms':>8} {'x':>6} | "
          f"{'draw base ms':>12} {'ours ms':>8} {'x':>6} | {'both x':>6} {'= base':>6} {'base = exact':>12} {'ours = exact':>12}")
    for scale in (float(s) for s in args.scales.split(",")):
        logits = torch.randn(args.rows, args.vocab, generator=gen) * scale
        base_f, ours_f = dream_top_p(logits, args.top_p), top_p_filter(logits, args.top_p)
        nucleus = int((base_f > torch.finfo(base_f.dtype).min).sum(-1).float().median())
        kept = lambda f: f > torch.finfo(f.dtype).min  # noqa: E731
        exact = kept(exact_top_p(logits, args.top_p))
        equal = float((kept(base_f) == kept(ours_f)).all(-1).float().mean())
        base_exact = float((kept(base_f) == exact).all(-1).float().mean())
        ours_exact = float((kept(ours_f) == exact).all(-1).float().mean())
        probs = torch.softmax(base_f, dim=-1)
        t_fb = best_ms(lambda: dream_top_p(logits, args.top_p), args.repeats)
        t_fo = best_ms(lambda: top_p_filter(logits, args.top_p), args.repeats)
        t_db = best_ms(lambda: torch.multinomial(probs, 1, generator=gen), args.repeats)
        t_do = best_ms(lambda: sample_tokens(probs, gen), args.repeats)
        print(f"{scale:>6g} {nucleus:>9d} | {t_fb:>13.1f} {t_fo:>8.1f} {t_fb / t_fo:>5.2f}x | {t_db:>12.1f} {t_do:>8.1f} "
              f"{t_db / t_do:>5.2f}x | {(t_fb + t_db) / (t_fo + t_do):>5.2f}x {equal:>6.3f} {base_exact:>12.3f} {ours_exact:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
