"""`run_stage(argv, make_stage, config_cls)`: parse, initialise distributed, build, train.

Exit codes: 0 done, 75 checkpointed after SIGTERM/SIGUSR1 (requeue me; training/signals.py),
2 bad configuration, 1 anything else. One process: `python -m megatron_diffu.pretrain ...`;
several: `torchrun --nproc-per-node N -m megatron_diffu.pretrain ...` (or srun; parallel/launch.py).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from megatron_diffu.config import PRINT_CONFIG_FLAG, ConfigError, RunConfig
from megatron_diffu.parallel.launch import init_distributed, shutdown_distributed
from megatron_diffu.training.checkpointing import CheckpointError
from megatron_diffu.training.trainer import Stage, Trainer, build_grid


def run_stage(argv: Optional[Sequence[str]], make_stage: Callable[[RunConfig], Stage], config_cls: type) -> int:
    """Entry point shared by the stages. `make_stage(cfg)` builds the stage from the parsed config.
    Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_cls.from_args(argv)
        if PRINT_CONFIG_FLAG in argv:  # the resolved configuration (YAML), validated for one process; exit
            cfg.validate(1)
            print(cfg.to_yaml(), end="")
            return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_distributed()
    try:
        world = dist.get_world_size() if dist.is_initialized() else 1
        cfg.validate(world)
        stage = make_stage(cfg)
        stage.configure(cfg, world)
        trainer = Trainer(cfg, stage, build_grid(cfg))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # --load: a corrupt tracker, a missing/truncated shard (named), another model
        print(f"error: checkpoint: {exc}", file=sys.stderr)
        return 2
    return trainer.train()


def exit_with(code: int) -> None:
    """End a `python -m` stage process: tear the process group down, then exit with `code`."""
    try:
        shutdown_distributed()
    finally:
        sys.exit(code)


__all__ = ["run_stage", "exit_with"]
