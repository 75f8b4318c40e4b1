"""Coupled micro-batches and the forward-only log-prob passes of the old and reference policies.

For inner iteration j of rollout batch k the mask seed is s_j = grpo_mask_seed(seed, k, j), shared
by the old, reference and current passes of that step. A micro-batch carries the coupled copies
built with s_j (`tokens` = [copies * B, S] model input, so the pipeline's shapes follow); all
copies of a sequence go through ONE forward with logits only at the needed positions
(vocab-parallel log-softmax). When the reference equals the policy (no update since the last
sync), the reference pass reuses the old pass.
"""
from __future__ import annotations

import torch

from megatron_diffu.common.seeding import grpo_mask_seed
from megatron_diffu.parallel.pipeline import forward_backward
from megatron_diffu.rl.coupled import build_coupled_batch, coupled_from_logits
from megatron_diffu.stages.grpo.rollout import RolloutBuffer, bcast_from_last_stage, gather_dp, local_rows
from megatron_diffu.stages.tokens import model_forward


def mask_seed(seed: int, rollout_index: int, inner: int) -> int:
    """The mask seed of inner iteration `inner` of rollout batch `rollout_index`."""
    return grpo_mask_seed(seed, rollout_index, inner)


def coupled_micro_batch(trainer, buf: RolloutBuffer, rows: range, inner: int, mask_token_id: int,
                        with_targets: bool = True) -> dict:
    """The coupled copies of `rows` for inner iteration `inner` (+ the loss's targets)."""
    g, dev = trainer.cfg.grpo, trainer.device
    sl = slice(rows.start, rows.stop)
    real = buf.real[sl]
    attn = None if bool(real.all()) else real.to(dev)
    cb = build_coupled_batch(buf.tokens[sl].to(dev), buf.maskable[sl].to(dev), buf.sample_index[sl],
                             mask_seed(trainer.cfg.data.seed, buf.rollout_index, inner), mask_token_id, g.estimator,
                             attn, None, g.coupled_t_min, g.coupled_t_max, False, g.p_mask_prompt,
                             g.coupled_p_mask_prompt)
    mb = {"tokens": cb.input_ids, "attention_mask": cb.attention_mask, "coupled": cb}
    if with_targets:
        old, ref = buf.old_logp[inner], buf.ref_logp[inner]
        mb.update(advantages=buf.advantages[sl].to(dev), completion_mask=buf.completion_mask[sl].to(dev),
                  old_logp=None if old is None else old[sl].to(dev),
                  ref_logp=None if ref is None else ref[sl].to(dev),
                  normaliser=loss_normaliser(trainer, buf, sl))
    return mb


def loss_normaliser(trainer, buf: RolloutBuffer, rows: slice) -> float:
    """What the micro-batch `rows` divides its summed token losses by (docs/ALGORITHMS.md sec. 5.4).

    micro_batch (DiffuCoder's compute_loss + HF gradient accumulation + DDP mean): each micro-batch
    takes the mean over its own completion tokens, and the step averages the M = gbs / mbs
    micro-batch means, so the divisor is M * (completion tokens of this micro-batch).
    global_tokens: every micro-batch divides by the completion tokens of the whole global batch.
    """
    if trainer.cfg.grpo.loss_normalization == "global_tokens":
        return float(buf.completion_mask.sum().clamp(min=1))
    per_step = trainer.global_batch_size // trainer.micro_batch_size
    return float(buf.completion_mask[rows].sum().clamp(min=1)) * per_step


def coupled_forward(model, batch: dict, input_tensor):
    return model_forward(model, batch["tokens"], input_tensor, attention_mask=batch["attention_mask"],
                         logit_positions=batch["coupled"].logit_positions)


class LogProbPasses:
    """Old-policy (mu > 1) and reference (beta != 0) per-token log-probs of a rollout batch."""

    def __init__(self, trainer, mask_token_id: int) -> None:
        self.trainer, self.mask_token_id = trainer, mask_token_id

    def fill(self, buf: RolloutBuffer, reference_model, reference_is_policy: bool) -> None:
        """Append, for every inner iteration, the old and reference estimates ([R, L] or None)."""
        g = self.trainer.cfg.grpo
        mu = g.num_iterations
        for j in range(mu):
            old = self.estimate(self.trainer.model, buf, j) if mu > 1 else None
            ref = None
            if g.beta != 0:
                ref = old if (reference_is_policy and old is not None) else self.estimate(reference_model, buf, j)
            buf.old_logp.append(old)
            buf.ref_logp.append(ref)

    def estimate(self, model, buf: RolloutBuffer, inner: int) -> torch.Tensor:
        """Forward-only estimate of this DP rank's rows, gathered over DP and shared over PP: [R, L]."""
        tr = self.trainer
        rows = local_rows(tr)
        chunk = tr.cfg.grpo.logp_chunk_size or tr.micro_batch_size
        mbs = [coupled_micro_batch(tr, buf, range(lo, min(lo + chunk, rows.stop)), inner, self.mask_token_id,
                                   with_targets=False)
               for lo in range(rows.start, rows.stop, chunk)]
        was_training = model.training
        model.eval()
        try:
            reports = forward_backward(self._forward_step, model, mbs, tr.grid, forward_only=True,
                                       dtype=tr.cfg.model.params_dtype)
        finally:
            model.train(was_training)
        if tr.grid.is_last_stage:
            local = torch.cat([r["logp"] for r in reports]).to(tr.device)
        else:
            local = torch.zeros(len(rows), buf.tokens.shape[1], dtype=torch.float32, device=tr.device)
        local = bcast_from_last_stage(local, tr.grid)
        return gather_dp(local, tr.grid).cpu()

    def _forward_step(self, model, batch: dict, input_tensor):
        out = coupled_forward(model, batch, input_tensor)
        est, tp = self.trainer.cfg.grpo.estimator, self.trainer.grid.tp_group

        def loss_fn(logits):
            logp, _ = coupled_from_logits(batch["coupled"], logits, est, tp)
            return torch.zeros((), device=logp.device), {"logp": logp.float()}
        return out, loss_fn
