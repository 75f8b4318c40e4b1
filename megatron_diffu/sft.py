"""Instruction tuning (SFT): `python -m megatron_diffu.sft --config examples/sft_tiny_cpu.yaml [flags]`
(the diffusion stage with response masking: megatron_diffu/stages/diffusion/; this module is its
entry point)."""
from __future__ import annotations

from typing import Optional

from megatron_diffu.stages.diffusion.config import SFTRunConfig
from megatron_diffu.stages.diffusion.recipes import sft_stage
from megatron_diffu.stages.main import exit_with, run_stage


def main(argv: Optional[list[str]] = None) -> int:
    return run_stage(argv, sft_stage, SFTRunConfig)


if __name__ == "__main__":
    exit_with(main())
