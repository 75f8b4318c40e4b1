"""Shared pieces of the training tests: a small real stdlib dataset and a tiny run config."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Optional

import torch

STDLIB = sysconfig.get_paths()["stdlib"]


def make_stdlib_dataset(out_dir: Path) -> str:
    """Tokenize a few stdlib packages with the Qwen tokenizer; returns the dataset prefix."""
    from megatron_diffu.data.preprocess import PreprocessConfig, run_preprocess

    prefix = Path(out_dir) / "stdlib"
    inputs = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email")]
    cfg = PreprocessConfig(input=inputs, output_prefix=str(prefix), extensions=[".py"], append_eod=True,
                           workers=1, skip_bad=True, log_interval=0)
    summary = run_preprocess(cfg)
    return summary.outputs["text"]


def tiny_args(data_prefix: str, train_iters: int = 4, extra: Optional[list] = None) -> list[str]:
    """Flags of a tiny, fast pretraining run on the real Qwen vocabulary (tied embeddings)."""
    args = ["--model-preset", "tiny", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--no-untie-embeddings-and-output-weights", "--max-position-embeddings", "64",
            "--data-path", data_prefix, "--split", "90,10,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(train_iters),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--min-lr", "3e-4", "--eval-interval", "0",
            "--log-interval", "1", "--seed", "1234", "--random-truncation-prob", "0.1", "--peak-flops", "1e10"]
    return args + list(extra or [])


def build_trainer(args: list[str], grid=None):
    from megatron_diffu.stages.diffusion.config import PretrainRunConfig
    from megatron_diffu.stages.diffusion.recipes import pretraining_stage
    from megatron_diffu.training.trainer import Trainer, build_grid

    cfg = PretrainRunConfig.from_args(args)
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg.validate(world)
    stage = pretraining_stage()
    stage.configure(cfg, world)
    # CPU, pinned: the default device would be CUDA on a GPU machine (one process, no NCCL), where
    # the bit-exact resume/golden comparisons of these tests do not hold (atomic-add kernels)
    return Trainer(cfg, stage, grid or build_grid(cfg), device=torch.device("cpu"))


def run_losses(args: list[str]) -> tuple[list[float], object]:
    trainer = build_trainer(args)
    trainer.train()
    return [m["loss"] for m in trainer.history], trainer
