"""The two configurations of the diffusion stage, built from a run config."""
from __future__ import annotations

from megatron_diffu.stages.diffusion.data import Conversations, PackedWindows
from megatron_diffu.stages.diffusion.humaneval import PeriodicHumanEval
from megatron_diffu.stages.diffusion.objective import (DocumentMasking, PerMaskable, PerMaskedToken, PerPosition,
                                                     ResponseMasking)
from megatron_diffu.stages.diffusion.stage import DiffusionStage


def pretraining_stage(cfg=None) -> DiffusionStage:
    """Packed token windows, every non-special token maskable, loss per position of the batch."""
    return DiffusionStage(PackedWindows(), DocumentMasking(), PerPosition(), name="pretrain")


def sft_stage(cfg) -> DiffusionStage:
    """Conversations, response-only masking, loss per maskable token (or per sequence), and
    HumanEval pass@1 every `sft.sft_eval_humaneval_interval` iterations when set."""
    n = cfg.sft.sft_loss_normalization
    hooks = [PeriodicHumanEval()] if cfg.sft.sft_eval_humaneval_interval else []
    normaliser = PerMaskedToken() if n == "masked" else PerMaskable(n)  # masked: Dream's SFT (1/t, / #masked)
    return DiffusionStage(Conversations(), ResponseMasking(n), normaliser, name="sft", hooks=hooks)
