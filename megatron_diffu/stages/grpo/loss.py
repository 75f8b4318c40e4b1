"""The training forward step of coupled-GRPO: the current policy's coupled estimate, then
`rl.loss.grpo_loss` (token-level clipped ratio + beta * k3 KL) divided by the micro-batch's
normaliser (`logprobs.loss_normaliser`: the mean of per-micro-batch token means, DiffuCoder's, or
the global completion-token count); either way the micro-batch losses add up to the step's loss."""
from __future__ import annotations

from megatron_diffu.rl.coupled import coupled_from_logits
from megatron_diffu.rl.loss import grpo_loss
from megatron_diffu.stages.grpo.logprobs import coupled_forward


def grpo_forward_step(trainer):
    """A pipeline forward step bound to `trainer`'s config and TP group."""
    g, tp = trainer.cfg.grpo, trainer.grid.tp_group

    def forward_step(model, batch: dict, input_tensor):
        out = coupled_forward(model, batch, input_tensor)

        def loss_fn(logits):
            logp, ent = coupled_from_logits(batch["coupled"], logits, g.estimator, tp, return_entropy=True)
            res = grpo_loss(logp, batch["advantages"], batch["completion_mask"], batch["old_logp"], batch["ref_logp"],
                            g.epsilon_low, g.epsilon_high, g.beta, batch["normaliser"], ent)
            return res.loss, dict(res.metrics, loss=res.loss.detach())
        return out, loss_fn

    return forward_step
