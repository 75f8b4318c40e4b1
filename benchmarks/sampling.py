#!/usr/bin/env python
"""Sampler throughput: every alg, steps in {N, N/2, N/4}, batch 1 and 8, exact path vs the
threshold and prefix-cache accelerations, beside a plain Dream-style reference loop in the same run.

    python benchmarks/sampling.py                       # random model (CPU-sized), N = 64
    python benchmarks/sampling.py --load CKPT --tokenizer-prompts ...   # a trained checkpoint
    python benchmarks/sampling.py --quick               # smaller matrix

Columns: tokens/s = batch * N / wall time of one generate call (after a warm-up call of the same
shape); `base tok/s` = the plain loop (one full forward per step, Dream's `_sample` written
straightforwardly, batched) at the same alg/steps/batch; `x base` = ratio; `agree` = fraction of
new tokens equal to the exact path at the same alg/steps/batch (temperature 0); `nfe` = forward
passes. On a random model the threshold path reflects an artificially sharpened head
(--sharpen), not a trained model's confidence; use --load for representative figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate  # noqa: E402

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


# ----------------------------------------------------------------------------- the plain baseline
@torch.no_grad()
def plain_loop(model, prompts, n_new, steps, alg, mask_id, pad_id, eps=1e-3, seed=0):
    """Dream's `_sample` at temperature 0, written plainly: full forward every step, batched."""
    P = max(map(len, prompts))
    x = torch.tensor([[pad_id] * (P - len(p)) + list(p) + [mask_id] * n_new for p in prompts])
    real = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + n_new) for p in prompts]).bool()
    kwargs = {}
    if not bool(real.all()):
        kwargs = dict(attention_mask=real[:, None, :, None] & real[:, None, None, :],
                      position_ids=(real.long().cumsum(-1) - 1).clamp_min(0))
    gen = torch.Generator().manual_seed(seed)
    ts = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        masked = x == mask_id
        if not masked.any():
            break
        logits = model(x, **kwargs).float()
        probs = torch.softmax(logits[masked], -1)
        conf, x0 = probs.max(-1)
        t, s = ts[i], ts[i + 1]
        if alg == "origin":
            p = 1.0 if i == steps - 1 else float(1 - s / t)
            move = torch.rand(x0.shape, generator=gen) < p
            vals = x[masked].clone()
            vals[move] = x0[move]
            x[masked] = vals
            continue
        if alg == "topk_margin":
            top2 = probs.topk(2, -1).values
            conf = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)
        full = torch.full(x.shape, -torch.inf)
        full[masked] = conf
        cand = torch.full(x.shape, mask_id)
        cand[masked] = x0
        for b in range(x.shape[0]):
            m = int(masked[b].sum())
            k = m if i == steps - 1 else int(torch.tensor(float(m)) * (1 - s / t))
            if k > 0:
                idx = full[b].topk(k).indices
                x[b, idx] = cand[b, idx]
    return x[:, P:]


# ----------------------------------------------------------------------------- harness
CLOCK = time.perf_counter


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        best = min(best, CLOCK() - t0)
    return best, out


def build_model(args):
    if args.load:
        from megatron_diffu.training.checkpointing import load_inference_model

        model, cfg = load_inference_model(args.load, device=args.device)
        return model, cfg.vocab_size
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer

    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 8 // 3,
                            num_attention_heads=max(1, args.hidden // 64), num_query_groups=max(1, args.hidden // 128),
                            vocab_size=args.vocab, max_position_embeddings=4096, seed=1)
    model = DiffusionTransformer(cfg, device=args.device).eval()
    with torch.no_grad():
        model.output_layer.weight.mul_(args.sharpen)
    return model, cfg.vocab_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="native checkpoint (default: a random model)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sharpen", type=float, default=20.0, help="scale of the random head (peaked predictions)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--block-length", type=int, default=16, help="block length of the cache rows")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="algs entropy+origin, batch 1 and 8, steps N and N/4")
    p.add_argument("--algs", default=",".join(ALGS), help="comma-separated subset of the algs")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (<= 8)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu = this process's CPU time (steadier on a shared machine; use with --threads 1)")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    model, vocab = build_model(args)
    mask_id, pad_id = vocab - 1, vocab - 2
    N = args.new_tokens
    g = torch.Generator().manual_seed(0)
    all_prompts = [torch.randint(0, vocab - 3, (args.prompt_length - (i % 4) * 3,), generator=g).tolist()
                   for i in range(8)]
    algs = ("origin", "entropy") if args.quick else tuple(a for a in args.algs.split(",") if a)
    batches = tuple(int(b) for b in args.batches.split(","))
    steps_list = (N, N // 4) if args.quick else (N, N // 2, N // 4)
    print(f"model: {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M params, vocab {vocab}; N={N} new tokens, "
          f"prompts ~{args.prompt_length} tokens; device {args.device}, {args.threads} thread(s), "
          f"{args.clock} clock (best of {args.repeats})")
    warm = SamplingConfig(max_new_tokens=N, steps=4, alg="entropy")
    diffusion_generate(model, all_prompts, warm, mask_id=mask_id, pad_id=pad_id)  # warm-up (allocator, kernels)
    plain_loop(model, all_prompts[:1], N, 4, "entropy", mask_id, pad_id)
    header = f"{'alg':<13}{'steps':>6}{'batch':>6}  {'mode':<24}{'tok/s':>9}{'base tok/s':>12}{'x base':>8}" \
             f"{'nfe':>6}{'agree':>8}  agree vs"
    print(header)
    print("-" * len(header))
    rows = []
    for alg in algs:
        for steps in steps_list:
            for batch in batches:
                prompts = all_prompts[:batch]
                t_base, base_out = timed(lambda: plain_loop(model, prompts, N, steps, alg, mask_id, pad_id), args.repeats)
                base_tps = batch * N / t_base
                bl = args.block_length
                # (name, extra config, the row its agreement is measured against)
                modes = [("exact", {}, None)]
                if steps == N:  # the accelerations target the one-token-per-step regime
                    if alg != "origin":
                        modes.append((f"threshold {args.threshold}", dict(threshold=args.threshold), "exact"))
                    modes.append((f"blocks {bl}", dict(block_length=bl), "exact"))
                    modes.append((f"blocks {bl} + cache", dict(block_length=bl, use_cache=True), f"blocks {bl}"))
                    if alg != "origin":
                        modes.append((f"blocks {bl} + thr", dict(block_length=bl, threshold=args.threshold),
                                      f"blocks {bl}"))
                        modes.append((f"blocks {bl} + thr + cache",
                                      dict(block_length=bl, threshold=args.threshold, use_cache=True),
                                      f"blocks {bl} + thr"))
                done: dict[str, torch.Tensor] = {}
                for name, extra, versus in modes:
                    cfg = SamplingConfig(max_new_tokens=N, steps=steps, alg=alg, temperature=0.0, **extra)
                    t, out = timed(lambda: diffusion_generate(model, prompts, cfg, mask_id=mask_id, pad_id=pad_id),
                                   args.repeats)
                    new = out.sequences[:, out.prompt_length:]
                    done[name] = new
                    if versus is None:  # the exact path against the plain loop (same algorithm)
                        agree = (new == base_out).float().mean().item() if alg != "origin" else float("nan")
                    else:
                        agree = (new == done[versus]).float().mean().item()
                    tps = batch * N / t
                    rows.append((alg, steps, batch, name, tps, base_tps, out.nfe, agree))
                    print(f"{alg:<13}{steps:>6}{batch:>6}  {name:<24}{tps:>9.1f}{base_tps:>12.1f}{tps / base_tps:>8.2f}"
                          f"{out.nfe:>6}{agree:>8.3f}  {versus or 'plain loop'}", flush=True)
    print("\nagree: fraction of new tokens equal to the row named in 'agree vs' (exact vs the plain loop: same "
          "algorithm, must be 1.000; origin draws its coins from another RNG protocol: n/a). The cache is judged "
          "against the same block schedule without cache. Absolute numbers on shared machines are noisy; the "
          "ratios come from the same run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
