"""The GRPO policy loss: token-level clipped ratio + beta * k3 KL (docs/ALGORITHMS.md sec. 5).

    rho_n  = exp(logp_n - logp_old_n)
    loss_n = -min(rho_n A, clip(rho_n, 1 - eps_low, 1 + eps_high) A) + beta * KL_n
    KL_n   = exp(ref_n - logp_n) - (ref_n - logp_n) - 1          (Schulman's k3, >= 0)
    loss   = sum_n completion_mask_n * loss_n / num_tokens

`num_tokens` defaults to the completion tokens of the batch given. A stage that splits one
optimizer step into chunks or micro-batches passes the *global* count of the step, so that the
chunk losses add up to the loss of the whole batch (and `backward` per chunk is exact).
Metrics follow the released DiffuCoder trainer: low/high/region clip fractions count tokens where
the clip actually changes the objective (ratio below 1-eps with A < 0, above 1+eps with A > 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class GRPOLossOutput:
    """`loss` is a differentiable scalar; `metrics` are detached fp32 scalars (sums / num_tokens)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1.

    Exactly 0 where logp == ref and >= 0 everywhere (x - 1 - log x >= 0 with x = exp(ref - logp)).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    eps_low: float = 0.5,
    eps_high: float = 0.5,
    beta: float = 0.01,
    num_tokens: Optional[float | torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> GRPOLossOutput:
    """Clipped-ratio + KL loss, averaged over completion tokens.

    Args:
        logp: [B, S] current-policy per-token log-probs (with grad).
        advantages: [B] (one per rollout) or [B, S] per token.
        completion_mask: [B, S] bool/0-1, tokens that carry loss (up to and incl. the first <|im_end|>).
        old_logp: [B, S] log-probs of the rollout policy; None means "same as logp" (one inner
            iteration: the ratio is 1 but its gradient is the policy gradient, as in TRL).
        ref_logp: [B, S] reference-model log-probs; required when beta != 0.
        num_tokens: normaliser (global completion-token count when the step is chunked).
        entropy: optional [B, S] per-token entropy, only averaged into the metrics.
    """
    mask = completion_mask.to(torch.float32)
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1.0)
    logp = logp.float()
    old = logp.detach() if old_logp is None else old_logp.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logp (the reference model's log-probs)")
        kl = k3_kl(logp, ref_logp.float())
        per_token = per_token + beta * kl
    loss = (per_token * mask).sum() / num_tokens
    metrics = _metrics(ratio.detach(), adv, mask, num_tokens, eps_low, eps_high, kl, entropy)
    return GRPOLossOutput(loss=loss, metrics=metrics)


def _metrics(
    ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, num_tokens, eps_low: float, eps_high: float,
    kl: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
) -> dict[str, torch.Tensor]:
    def mean(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() * mask).sum() / num_tokens).detach()

    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    out = {
        "clip_fraction_low": mean(low),
        "clip_fraction_high": mean(high),
        "clip_fraction": mean(low | high),
        "ratio_mean": mean(ratio),
        "completion_tokens": mask.sum().detach(),
    }
    if kl is not None:
        out["kl"] = mean(kl.detach())
    if entropy is not None:
        out["entropy"] = mean(entropy.detach())
    return out


def chunked_grpo_backward(
    model,
    tokens: torch.Tensor,
    maskable: torch.Tensor,
    completion_mask: torch.Tensor,
    sample_index: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor],
    *,
    mask_seed: int,
    mask_id: int,
    chunk_size: int,
    eps_low: float = 0.5,
    eps_high: float = 0.5,
    beta: float = 0.01,
    estimator: str = "coupled",
    tp_group=None,
    num_tokens: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    p_mask_prompt: float = 0.15,
    coupled_p_mask_prompt: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Current-policy estimate + loss + backward, `chunk_size` sequences at a time.

    Memory is bounded by one chunk's graph (copies * chunk_size rows), and the gradients equal
    those of the whole batch because every chunk's loss uses the same global normaliser
    (`num_tokens`, default: this batch's completion tokens; a stage splitting a step over
    micro-batches / DP ranks passes the step's global count). Returns the summed metrics
    (each metric is a mean over `num_tokens`, so chunk values add up) plus "loss".
    """
    from megatron_diffu.rl.coupled import estimate_log_probs

    if num_tokens is None:
        num_tokens = float(completion_mask.sum().clamp(min=1))
    totals: dict[str, torch.Tensor] = {}
    for lo in range(0, tokens.shape[0], max(1, int(chunk_size))):
        sl = slice(lo, lo + max(1, int(chunk_size)))
        logp, ent = estimate_log_probs(
            model, tokens[sl], maskable[sl], sample_index[sl], mask_seed, mask_id, estimator,
            None if attention_mask is None else attention_mask[sl],
            None if position_ids is None else position_ids[sl], tp_group, None, return_entropy,
            p_mask_prompt=p_mask_prompt, coupled_p_mask_prompt=coupled_p_mask_prompt,
        )
        out = grpo_loss(
            logp, advantages[sl], completion_mask[sl], None if old_logp is None else old_logp[sl],
            None if ref_logp is None else ref_logp[sl], eps_low, eps_high, beta, num_tokens, ent,
        )
        out.loss.backward()
        for k, v in dict(out.metrics, loss=out.loss.detach()).items():
            totals[k] = totals.get(k, 0.0) + v
    return totals
