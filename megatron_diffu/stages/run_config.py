"""The sections every training stage shares, and the batch arithmetic derived from them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_diffu.config import RunConfig
from megatron_diffu.data.config import DataConfig
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.parallel.config import ParallelConfig
from megatron_diffu.training.config import CheckpointConfig, LoggingConfig, OptimizerConfig, TrainingConfig


@dataclass
class StageRunConfig(RunConfig):
    """model + parallel + data + optimizer + training + checkpoint + logging; stages add theirs."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------ batch arithmetic
    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        return max(1, world_size // max(1, mp))

    def resolved_global_batch_size(self, world_size: int) -> int:
        t = self.training
        return t.global_batch_size or t.micro_batch_size * self.data_parallel_size(world_size)

    def num_micro_batches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.resolved_global_batch_size(world_size) // (self.training.micro_batch_size * dp)

    def resolved_train_iters(self, world_size: int) -> int:
        t = self.training
        if t.train_iters is not None:
            return int(t.train_iters)
        gbs = self.resolved_global_batch_size(world_size)
        return -(-int(t.train_samples or 0) // gbs)

    # ------------------------------------------------------------------ validation
    def section_context(self, name: str, world_size: int) -> dict[str, Any]:
        if name == "model":
            return {"tp_size": self.parallel.tensor_model_parallel_size,
                    "pp_size": self.parallel.pipeline_model_parallel_size}
        return {}

    def cross_section_problems(self, world_size: int) -> list[str]:
        e = super().cross_section_problems(world_size)
        p, t = self.parallel, self.training
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % mp:
            e.append(f"world size {world_size} is not divisible by tensor_model_parallel_size * "
                     f"pipeline_model_parallel_size = {mp}: launch a multiple of {mp} processes")
            return e
        dp = world_size // mp
        gbs = self.resolved_global_batch_size(world_size)
        if gbs % (t.micro_batch_size * dp):
            e.append(f"training.global_batch_size={gbs} is not divisible by micro_batch_size * data-parallel size "
                     f"= {t.micro_batch_size} * {dp} = {t.micro_batch_size * dp}: use a multiple of "
                     f"{t.micro_batch_size * dp} (e.g. --global-batch-size {max(1, gbs // (t.micro_batch_size * dp)) * t.micro_batch_size * dp})")
        seq = self.data.seq_length
        if seq > self.model.max_position_embeddings:
            e.append(f"data.seq_length={seq} exceeds model.max_position_embeddings={self.model.max_position_embeddings}")
        if p.sequence_parallel and seq % p.tensor_model_parallel_size:
            e.append(f"--sequence-parallel needs seq_length ({seq}) divisible by tensor_model_parallel_size "
                     f"({p.tensor_model_parallel_size})")
        return e
