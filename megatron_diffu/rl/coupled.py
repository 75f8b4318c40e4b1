"""Per-token log-probability estimators of a masked-diffusion policy (docs/ALGORITHMS.md sec. 5).

A diffusion LM has no exact per-token likelihood; GRPO needs one for the ratio and the KL. The
coupled estimator of DiffuCoder (released code: `DiffuGRPOTrainer.forward_process` +
`selective_log_softmax`), for one mask seed:

    t ~ U(0.2, 0.8)                      one value per mask seed (as the released code), option: per sequence
    R_n ~ U(0, 1)                        per generated token, keyed by (mask seed, sample index)
    x_full: every maskable token masked
    x_a:    maskable tokens with R_n <  t masked
    x_b:    maskable tokens with R_n >= t masked   (x_a, x_b complementary: each token masked in exactly one)
    logp_n = ( log p(o_n | x_full) + [R_n < t] log p(o_n | x_a) / t + [R_n >= t] log p(o_n | x_b) / (1 - t) ) / 2

The prompt is never masked (option `coupled_p_mask_prompt` > 0, a deviation: every prompt token is
masked with that probability, by one draw shared by the copies of a sequence, as d1 masks its
prompt; log-probs are still read on the completion only). The three copies of every sequence go
through ONE forward, and the head computes logits only where a log-prob is needed
(`logit_positions`: all maskable positions of x_full, the masked ones of x_a and x_b, i.e. 2 rows
per token instead of 3 full sequences).
Log-probs come from `vocab_parallel_log_probs` on the vocab-sharded logits: the full vocabulary
is never gathered. `chunk_size` bounds memory by running the sequences in chunks
(`rl/loss.py: chunked_grpo_backward` does the same for the current-policy pass under grad).

Baselines (`estimator=`):
- `single`: one random mask instead of the complementary pair, with the same expectation as the
  coupled estimator: ( log p(o_n | x_full) + 2 [R_n < t] log p(o_n | x_a) / t ) / 2. It is the
  reference the coupled estimator's variance reduction is measured against.
- `d1`: diffu-GRPO (d1, Zhao et al. 2025): every completion token masked, every prompt token
  masked independently with probability `p_mask_prompt`; logp_n = log p(o_n | that sequence).

Decisions (DESIGN.md leaves them open):
- `maskable` is the region that gets noised: every generated position, padding after the first
  <|im_end|> included (the released code masks all of `~prompt_index`); the loss later keeps only
  the completion mask. Positions outside `maskable` get log-prob 0 in the output.
- Noise is a function of (mask_seed, sample_index, purpose) only (per-sample torch.Generator),
  never of rank, TP/DP layout or chunking, so old / reference / current passes that share the
  mask seed see exactly the same masks, on any layout.
- For pipeline parallelism the forward is split out: `build_coupled_batch` gives the model inputs
  and `coupled_from_logits` turns the last stage's logits into log-probs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from megatron_diffu.diffusion.objective import keyed_generator  # the one noise-key hash of the package

Estimator = Literal["coupled", "single", "d1"]
_COPIES = {"coupled": 3, "single": 2, "d1": 1}


@dataclass
class CoupledNoise:
    """The random part of one estimate: t [B], R [B, S] and the masks of the noised copies."""

    t: torch.Tensor
    r: torch.Tensor
    mask_a: torch.Tensor  # maskable & (R < t)
    mask_b: torch.Tensor  # maskable & (R >= t)


def draw_noise(
    maskable: torch.Tensor,
    sample_index: torch.Tensor,
    mask_seed: int,
    t_min: float = 0.2,
    t_max: float = 0.8,
    per_sequence_t: bool = False,
) -> CoupledNoise:
    """Draw t and R for a batch; masks are complementary within `maskable` by construction."""
    bsz, seq = maskable.shape
    if per_sequence_t:
        u = torch.stack([torch.rand((), generator=keyed_generator(mask_seed, int(i), "coupled_t")) for i in sample_index.tolist()])
    else:
        u = torch.rand((), generator=keyed_generator(mask_seed, -1, "coupled_t")).expand(bsz)
    t = (t_min + (t_max - t_min) * u).to(torch.float32)
    r = torch.stack([torch.rand(seq, generator=keyed_generator(mask_seed, int(i), "coupled_r")) for i in sample_index.tolist()])
    r = r.to(maskable.device)
    t = t.to(maskable.device)
    maskable = maskable.bool()
    below = r < t[:, None]
    return CoupledNoise(t=t, r=r, mask_a=maskable & below, mask_b=maskable & ~below)


def _prompt_noise(maskable: torch.Tensor, sample_index: torch.Tensor, mask_seed: int, p: float,
                  purpose: str = "d1_prompt") -> torch.Tensor:
    """d1's random prompt masking (also coupled's option): every non-maskable position masked with
    probability p, one uniform per (mask seed, sample, position) from the `purpose` stream."""
    if p <= 0:
        return torch.zeros_like(maskable, dtype=torch.bool)
    r = torch.stack([torch.rand(maskable.shape[1], generator=keyed_generator(mask_seed, int(i), purpose)) for i in sample_index.tolist()])
    return (r.to(maskable.device) < p) & ~maskable.bool()


@dataclass
class CoupledBatch:
    """Model inputs for all copies ([copies * B, S], copy-major) and how to read the logits back."""

    input_ids: torch.Tensor
    logit_positions: torch.Tensor
    targets: torch.Tensor  # [N] clean tokens at logit_positions, in nonzero order
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    noise: Optional[CoupledNoise]
    copies: int


def _repeat(x: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return None if x is None else x.repeat(n, *([1] * (x.dim() - 1)))


def build_coupled_batch(
    tokens: torch.Tensor,
    maskable: torch.Tensor,
    sample_index: torch.Tensor,
    mask_seed: int,
    mask_id: int,
    estimator: Estimator = "coupled",
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    t_min: float = 0.2,
    t_max: float = 0.8,
    per_sequence_t: bool = False,
    p_mask_prompt: float = 0.15,
    coupled_p_mask_prompt: float = 0.0,
) -> CoupledBatch:
    """Noised copies of `tokens` for one estimate (see the module docstring for each estimator).
    `p_mask_prompt` is d1's prompt masking, `coupled_p_mask_prompt` that of coupled and single."""
    if estimator not in _COPIES:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(_COPIES)}")
    maskable = maskable.bool()
    noise = None
    if estimator == "d1":
        masks = [maskable | _prompt_noise(maskable, sample_index, mask_seed, p_mask_prompt)]
        positions = [maskable]
    else:
        noise = draw_noise(maskable, sample_index, mask_seed, t_min, t_max, per_sequence_t)
        positions = [maskable, noise.mask_a] + ([noise.mask_b] if estimator == "coupled" else [])
        prompt = _prompt_noise(maskable, sample_index, mask_seed, coupled_p_mask_prompt, "coupled_prompt")
        masks = [m | prompt for m in positions]  # log-probs are only read where the completion is masked
    copies = len(masks)
    input_ids = torch.cat([torch.where(m, torch.full_like(tokens, mask_id), tokens) for m in masks])
    logit_positions = torch.cat(positions)
    targets = tokens.repeat(copies, 1)[logit_positions]
    return CoupledBatch(
        input_ids=input_ids, logit_positions=logit_positions, targets=targets,
        attention_mask=_repeat(attention_mask, copies), position_ids=_repeat(position_ids, copies),
        noise=noise, copies=copies,
    )


def per_copy_log_probs(batch: CoupledBatch, token_logp: torch.Tensor) -> torch.Tensor:
    """Per-row log-probs [N] scattered back to [copies, B, S] (0 where a copy reads no log-prob)."""
    full = torch.zeros(batch.logit_positions.shape, dtype=token_logp.dtype, device=token_logp.device)
    full = full.masked_scatter(batch.logit_positions, token_logp)
    return full.view(batch.copies, -1, full.shape[-1])


def combine_copies(batch: CoupledBatch, token_logp: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """Apply the estimator's formula to the per-row log-probs [N] -> [B, S]."""
    per_copy = per_copy_log_probs(batch, token_logp)
    if estimator == "d1":
        return per_copy[0]
    t = batch.noise.t.to(token_logp.dtype)[:, None]
    if estimator == "single":
        return (per_copy[0] + 2.0 * per_copy[1] / t) / 2.0
    full, pair = coupled_terms(per_copy, t)
    return (full + pair) / 2.0


def coupled_terms(per_copy: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupled estimator's two terms [B, S] from its copies' log-probs [3, B, S]: log p(o_n | x_full)
    and the complementary pair's 1/t-weighted log p(o_n | x_a or x_b); the estimate is their mean.
    Copy 1 is nonzero only where R < t, copy 2 only where R >= t (complementary masks)."""
    return per_copy[0], per_copy[1] / t + per_copy[2] / (1.0 - t)


def coupled_from_logits(
    batch: CoupledBatch,
    logits_local: torch.Tensor,
    estimator: Estimator = "coupled",
    tp_group=None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs [B, S] (and the entropy of the x_full predictions [B, S]) from [N, V/tp] logits."""
    from megatron_diffu.parallel.cross_entropy import vocab_parallel_entropy, vocab_parallel_log_probs

    token_logp = vocab_parallel_log_probs(logits_local, batch.targets, tp_group)
    logp = combine_copies(batch, token_logp.float(), estimator)
    entropy = None
    if return_entropy:
        with torch.no_grad():
            # Rows of the first copy come first in nonzero order (copy-major layout).
            n_full = int(batch.logit_positions[: batch.logit_positions.shape[0] // batch.copies].sum())
            ent = vocab_parallel_entropy(logits_local[:n_full].detach(), tp_group).float()
            first = batch.logit_positions[: batch.logit_positions.shape[0] // batch.copies]
            entropy = torch.zeros(first.shape, dtype=ent.dtype, device=ent.device).masked_scatter(first, ent)
    return logp, entropy


def estimate_log_probs(
    model: Callable,
    tokens: torch.Tensor,
    maskable: torch.Tensor,
    sample_index: torch.Tensor,
    mask_seed: int,
    mask_id: int,
    estimator: Estimator = "coupled",
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    tp_group=None,
    chunk_size: Optional[int] = None,
    return_entropy: bool = False,
    t_min: float = 0.2,
    t_max: float = 0.8,
    per_sequence_t: bool = False,
    p_mask_prompt: float = 0.15,
    coupled_p_mask_prompt: float = 0.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-prob estimates [B, S] fp32 (0 outside `maskable`) and optional entropy.

    `model(input_ids, attention_mask=, position_ids=, logit_positions=)` must return the
    vocab-sharded logits of the requested positions ([N, V/tp], DESIGN.md). Sequences are run
    `chunk_size` at a time (each chunk is one forward of copies * chunk_size rows). Under grad the
    chunks' graphs are all kept: to bound training memory, call this per chunk and backward each
    chunk's loss with a global normaliser (`grpo_loss(num_tokens=...)`).
    """
    bsz = tokens.shape[0]
    step = bsz if not chunk_size else max(1, int(chunk_size))
    outs, ents = [], []
    for lo in range(0, bsz, step):
        sl = slice(lo, min(bsz, lo + step))
        batch = build_coupled_batch(
            tokens[sl], maskable[sl], sample_index[sl], mask_seed, mask_id, estimator,
            None if attention_mask is None else attention_mask[sl],
            None if position_ids is None else position_ids[sl],
            t_min, t_max, per_sequence_t, p_mask_prompt, coupled_p_mask_prompt,
        )
        logits = model(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            logit_positions=batch.logit_positions,
        )
        logp, ent = coupled_from_logits(batch, logits, estimator, tp_group, return_entropy)
        outs.append(logp)
        ents.append(ent)
    entropy = torch.cat(ents) if return_entropy else None
    return torch.cat(outs), entropy
