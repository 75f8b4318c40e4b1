"""The diffusion stage: pretraining and SFT are this one stage with different parts plugged in.

    DiffusionStage(data=PackedWindows(), masking=DocumentMasking(), normaliser=PerPosition())   # pretraining
    DiffusionStage(data=Conversations(), masking=ResponseMasking(n), normaliser=PerMaskable(n),
                   hooks=[PeriodicHumanEval()])                                                 # SFT

(`recipes.py` builds both from a run config.) A step: the data gives this DP rank's micro-batches,
the normaliser fixes the global-batch divisor, each micro-batch is noised by the masking policy in
the forward step, and the loss is the weighted masked cross-entropy over that divisor
(docs/ALGORITHMS.md sec. 2-3). Validation is the ELBO on the held-out batches.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_diffu.diffusion import objective as obj
from megatron_diffu.parallel.pipeline import forward_backward
from megatron_diffu.stages.diffusion.objective import PerMaskedToken
from megatron_diffu.stages.tokens import model_forward, resolve_tokens, to_device
from megatron_diffu.training.trainer import Stage, StepInputs, StepReport, Trainer


class DiffusionStage(Stage):
    """Masked-diffusion training on the trainer: data x masking policy x loss normaliser."""

    def __init__(self, data, masking, normaliser, name: str = "pretrain", hooks: Sequence = ()) -> None:
        self.data, self.masking, self.normaliser = data, masking, normaliser
        self.name, self.hooks = name, list(hooks)
        self.trainer: Optional[Trainer] = None
        self.tokenizer = None
        self.mask_token_id: Optional[int] = None
        self.special_ids: list[int] = []

    # ------------------------------------------------------------------ configuration
    def configure(self, cfg, world_size: int) -> None:
        """Before the model is built: the tokenizer fixes the (padded) vocabulary and the mask id."""
        tokens = resolve_tokens(cfg, tuple(cfg.diffusion.never_mask_token_ids), cfg.diffusion.mask_token_id)
        cfg.diffusion.mask_token_id = tokens.mask_token_id  # recorded in the checkpoint's run config
        self.tokenizer, self.mask_token_id = tokens.tokenizer, tokens.mask_token_id
        # ids a batch without its own `maskable` never masks: never_mask_token_ids, plus eod/bos
        # unless they are maskable (`mask_eod`, the default: DiffuLLaMA masks every position)
        never = set(cfg.diffusion.never_mask_token_ids)
        self.special_ids = sorted(never if cfg.diffusion.mask_eod else set(tokens.special_ids) | never)
        if self.normaliser.name == "position" and cfg.diffusion.loss_normalization == "masked":
            self.normaliser = PerMaskedToken()  # pretraining's normaliser follows diffusion.loss_normalization

    def setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.tokenizer is None:
            self.configure(trainer.cfg, trainer.grid.world_size)
        self.data.setup(trainer, self.tokenizer)

    # ------------------------------------------------------------------ one step
    def step_inputs(self, trainer: Trainer) -> StepInputs:
        batches = self.data.micro_batches(trainer)
        total = self.normaliser.global_total(batches, trainer)
        return StepInputs([to_device(dict(b, normaliser=total), trainer.device) for b in batches])

    def forward_step(self, model, batch: dict, input_tensor: Optional[torch.Tensor]):
        inputs = self.masking.noise(batch, self.trainer, self.mask_token_id, self.special_ids)
        normaliser = self.normaliser.divisor(float(batch["normaliser"]), inputs)
        units = self.normaliser.units(batch, inputs)
        extras = {"normaliser_units": torch.tensor(units)}
        if "response_mask" in batch:
            extras["response_tokens"] = torch.tensor(float(batch["response_mask"].sum()))
        out = model_forward(model, inputs.input_ids, input_tensor, attention_mask=inputs.attention_mask,
                            position_ids=inputs.position_ids, logit_positions=inputs.logit_positions)
        tp_group = self.trainer.grid.tp_group

        def loss_fn(logits):
            loss, report = obj.loss_from_logits(logits, inputs, normaliser, tp_group)
            return loss, dict(report, **extras)

        return out, loss_fn

    def step_report(self, trainer: Trainer, inputs: StepInputs, totals: dict[str, float]) -> StepReport:
        """Log values, and what the step processed: the positions of the global batch as padded
        (pretraining: gbs * S; SFT: each micro-batch's length bucket), logits only at the masked ones."""
        positions = totals.get("num_tokens", 0.0)
        masked = totals.get("num_masked", 0.0)
        metrics = {"loss": totals.get("loss_sum", float("nan")) / max(totals.get("normaliser_units", 0.0), 1.0),
                   "masked_ce": totals.get("ce_sum", float("nan")) / max(masked, 1.0),
                   "mask_fraction": masked / max(positions, 1.0)}
        if "response_tokens" in totals:
            metrics["response_tokens"] = totals["response_tokens"]
        tokens = positions or trainer.global_batch_size * trainer.cfg.data.seq_length
        flops = trainer.cfg.model.step_flops(body_tokens=tokens, head_rows=masked, seq_length=trainer.cfg.data.seq_length)
        return StepReport(metrics, tokens, flops)

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        for hook in self.hooks:
            hook(self, trainer)

    # ------------------------------------------------------------------ validation
    def validate(self, trainer: Trainer) -> dict[str, float]:
        """The ELBO bound on held-out batches: `eval_mc_samples` fixed-noise draws per sequence."""
        held_out = self.data.held_out()
        if held_out is None:
            return {}
        cfg = trainer.cfg
        it = iter(held_out)
        batches = []
        for _ in range(cfg.training.eval_iters * trainer.num_micro_batches):
            try:
                b = to_device(next(it), trainer.device)
            except StopIteration:
                break
            batches.extend(dict(b, mc_index=k) for k in range(cfg.diffusion.eval_mc_samples))
        if not batches:
            return {}
        reports = forward_backward(self.elbo_forward_step, trainer.model, batches, trainer.grid, forward_only=True,
                                   dtype=cfg.model.params_dtype)
        totals = trainer.reduce_reports(reports)
        return obj.elbo_metrics(totals.get("elbo_nll_sum", 0.0), totals.get("elbo_tokens", 0.0))

    def elbo_forward_step(self, model, batch: dict, input_tensor: Optional[torch.Tensor]):
        cfg = self.trainer.cfg
        inputs = obj.elbo_inputs(batch, cfg.diffusion, int(batch["mc_index"]), mask_token_id=self.mask_token_id,
                                 special_ids=self.special_ids, logit_shift=cfg.model.logit_shift)
        predictable = obj.predictable_count(batch, self.special_ids, cfg.model.logit_shift, cfg.diffusion)
        out = model_forward(model, inputs.input_ids, input_tensor, attention_mask=inputs.attention_mask,
                            position_ids=inputs.position_ids, logit_positions=inputs.logit_positions)
        tp_group = self.trainer.grid.tp_group
        return out, lambda logits: (logits.float().sum() * 0.0,
                                    obj.elbo_report(logits, inputs, predictable, tp_group))
