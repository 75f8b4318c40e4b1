"""The two knobs of the diffusion stage (docs/ALGORITHMS.md sec. 2-3).

Masking policy: how a clean micro-batch becomes the model input and the loss's targets/weights.
- `DocumentMasking` (pretraining): every token but the specials may be masked; random truncation
  and attention-mask annealing as configured; t stratified over the global batch.
- `ResponseMasking` (SFT): only `maskable` (response + trailing padding) tokens; no truncation;
  with `sequence` normalisation each weight is divided by its sequence's maskable count.

Loss normaliser: the global-batch quantity the summed loss is divided by (the trainer sums the
micro-batch gradients over micro-batches and DP ranks, so each micro-batch divides by the global
total). `units(batch)` is a micro-batch's share; `global_total` the step's sum.
- `PerPosition` (pretraining): every position of the global batch, gbs * S (no communication).
- `PerMaskable` (SFT): maskable tokens (`token`) or sequences/conversations (`sequence`),
  all-reduced over data-parallel ranks once per step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_diffu.diffusion import objective as obj
from megatron_diffu.parallel.state import group_size

SFT_NORMALIZATIONS = ("token", "sequence", "masked")


# ------------------------------------------------------------------------------------ masking
class DocumentMasking:
    name = "document"

    def noise(self, batch: dict, trainer, mask_token_id: int, special_ids: list[int]) -> obj.DiffusionInputs:
        cfg = trainer.cfg
        return obj.prepare_inputs(batch, cfg.diffusion, seed=cfg.data.seed, mask_token_id=mask_token_id,
                                  special_ids=special_ids, logit_shift=cfg.model.logit_shift,
                                  iteration=trainer.iteration, purpose="train", stratify_group=trainer.global_batch_size)


class ResponseMasking:
    name = "response"

    def __init__(self, normalization: str = "token") -> None:
        if normalization not in SFT_NORMALIZATIONS:
            raise ValueError(f"sft_loss_normalization={normalization!r}: choose one of {SFT_NORMALIZATIONS}")
        self.normalization = normalization

    def noise(self, batch: dict, trainer, mask_token_id: int, special_ids: list[int]) -> obj.DiffusionInputs:
        cfg = trainer.cfg
        return sft_inputs(batch, cfg.diffusion, seed=cfg.data.seed, mask_token_id=mask_token_id,
                          logit_shift=cfg.model.logit_shift, normalization=self.normalization,
                          stratify_group=trainer.global_batch_size)


def sft_inputs(batch: dict, cfg: obj.DiffusionConfig, *, seed: int, mask_token_id: int, logit_shift: bool = True,
               normalization: str = "token", stratify_group: Optional[int] = None,
               purpose: str = "sft") -> obj.DiffusionInputs:
    """Noise an SFT micro-batch: only `maskable` (response + trailing padding) may be masked, with
    probability t ~ U(t_eps, 1) keyed by (seed, sample_index); weights 1/t (or CART), and with
    `sequence` normalisation each weight is divided by its sequence's maskable count."""
    inputs = obj.prepare_inputs(batch, cfg, seed=seed, mask_token_id=mask_token_id, special_ids=[],
                                logit_shift=logit_shift, purpose=purpose, stratify_group=stratify_group,
                                truncation=False)
    if normalization == "sequence":
        counts, _ = sequence_counts(batch)
        scale = 1.0 / counts.clamp(min=1).to(inputs.weights.dtype)
        inputs.weights = inputs.weights * scale[inputs.logit_positions]
    return inputs


def sequence_counts(batch: dict) -> tuple[torch.Tensor, int]:
    """([B, S] maskable count of the sequence (conversation) each position belongs to, #sequences)."""
    maskable = batch["maskable"]
    seg = batch.get("segment_ids")
    if seg is None:
        counts = maskable.sum(1, keepdim=True).expand_as(maskable)
        return counts, int((maskable.sum(1) > 0).sum())
    nseg = int(seg.max()) + 1
    per = torch.zeros(seg.shape[0], nseg, dtype=torch.long, device=seg.device)
    per.scatter_add_(1, seg, maskable.long())
    return per.gather(1, seg), int((per > 0).sum())


# ------------------------------------------------------------------------------------ normalisers
class PerPosition:
    name = "position"

    def units(self, batch: dict, inputs=None) -> float:
        return float(batch["tokens"].numel())

    def global_total(self, micro_batches: list[dict], trainer) -> float:
        return float(trainer.global_batch_size * micro_batches[0]["tokens"].shape[1])

    def divisor(self, total: float, inputs) -> float:
        return total


class PerMaskedToken:
    """DiffuLLaMA's normaliser (its train.py: `(dsigma * loss).sum() / loss_mask.sum()` per
    micro-batch, averaged over gradient-accumulation steps and DP ranks): each micro-batch divides
    by its own masked count, times M = gbs / mbs micro-batches of the step, so the step's loss is
    the mean of the micro-batch means (docs/ALGORITHMS.md sec. 2.4)."""

    name = "masked"

    def units(self, batch: dict, inputs=None) -> float:
        return 0.0 if inputs is None else float(inputs.targets.numel())

    def global_total(self, micro_batches: list[dict], trainer) -> float:
        return float(trainer.global_batch_size // trainer.micro_batch_size)

    def divisor(self, total: float, inputs) -> float:
        return total * max(float(inputs.targets.numel()), 1.0)


class PerMaskable:
    name = "maskable"

    def __init__(self, normalization: str = "token") -> None:
        self.normalization = normalization

    def divisor(self, total: float, inputs) -> float:
        return total

    def units(self, batch: dict, inputs=None) -> float:
        """This micro-batch's share of the global normaliser: maskable tokens, or sequences."""
        if self.normalization == "token":
            return float(batch["maskable"].sum())
        return float(sequence_counts(batch)[1])

    def global_total(self, micro_batches: list[dict], trainer) -> float:
        units = torch.tensor(sum(self.units(b) for b in micro_batches), dtype=torch.float64)
        if group_size(trainer.grid.dp_group) > 1:
            units = units.to(trainer.device)
            dist.all_reduce(units, group=trainer.grid.dp_group)
        return max(float(units.item()), 1.0)
