"""Run configs of the diffusion stage: pretraining = the shared sections + `diffusion:`;
SFT = pretraining's + `sft:` (finetuning is configuration, not a subclass of the stage)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_diffu.data.sft import SFTDataConfig
from megatron_diffu.diffusion.objective import DiffusionConfig
from megatron_diffu.stages.run_config import StageRunConfig


@dataclass
class PretrainRunConfig(StageRunConfig):
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


@dataclass
class SFTRunConfig(PretrainRunConfig):
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)

    def cross_section_problems(self, world_size: int) -> list[str]:
        e = super().cross_section_problems(world_size)
        if self.diffusion.attention_mask_annealing_iters:
            e.append("diffusion.attention_mask_annealing_iters applies to AR adaptation (pretraining), not SFT: set it to 0")
        if self.diffusion.loss_normalization != "position":
            e.append("diffusion.loss_normalization applies to pretraining; SFT's normaliser is sft.sft_loss_normalization "
                     "(token | sequence | masked): leave diffusion.loss_normalization at position")
        return e

    def fp8_lengths(self) -> list[tuple[str, int]]:
        """Bucketed SFT pads a micro-batch to its bucket (at most seq_length); a bucket cut shorter by
        sft_response_cutoff / sft_tail_cut_prob is padded up to the FP8 length multiple (collator)."""
        seq = self.data.seq_length  # a bucket >= seq_length pads to seq_length, checked already
        return super().fp8_lengths() + [("sft.sft_length_buckets", b) for b in self.sft.sft_length_buckets if b < seq]
