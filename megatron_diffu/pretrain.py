"""Masked-diffusion pretraining: `python -m megatron_diffu.pretrain --config FILE.yaml [flags]`
(the stage: megatron_diffu/stages/diffusion/; this module is its entry point)."""
from __future__ import annotations

from typing import Optional

from megatron_diffu.stages.diffusion.config import PretrainRunConfig
from megatron_diffu.stages.diffusion.recipes import pretraining_stage
from megatron_diffu.stages.main import exit_with, run_stage


def main(argv: Optional[list[str]] = None) -> int:
    return run_stage(argv, pretraining_stage, PretrainRunConfig)


if __name__ == "__main__":
    exit_with(main())
