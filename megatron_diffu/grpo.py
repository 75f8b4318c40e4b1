"""Coupled-GRPO: `python -m megatron_diffu.grpo --config examples/grpo_tiny_cpu.yaml [flags]`
(the stage: megatron_diffu/stages/grpo/; this module is its entry point)."""
from __future__ import annotations

from typing import Optional

from megatron_diffu.stages.grpo.config import GRPORunConfig
from megatron_diffu.stages.grpo.stage import GRPOStage
from megatron_diffu.stages.main import exit_with, run_stage


def main(argv: Optional[list[str]] = None) -> int:
    return run_stage(argv, lambda cfg: GRPOStage(), GRPORunConfig)


if __name__ == "__main__":
    exit_with(main())
