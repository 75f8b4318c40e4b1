"""`ParallelConfig`: the process layout (field names = Megatron argument names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_diffu.config import SectionConfig


@dataclass
class ParallelConfig(SectionConfig):
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    pipeline_model_parallel_split: Optional[list[int]] = None  # layers per stage; None = even split
    # fp32 weights: dW accumulated into the fp32 gradient buffer inside its GEMM / scatter-add
    # (parallel/layers.py); Megatron's flag, off with --no-gradient-accumulation-fusion
    gradient_accumulation_fusion: bool = True

    def problems(self) -> list[str]:
        e = []
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            e.append("parallel: --tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if self.pipeline_model_parallel_split is not None and \
                len(self.pipeline_model_parallel_split) != self.pipeline_model_parallel_size:
            e.append(f"parallel.pipeline_model_parallel_split={self.pipeline_model_parallel_split} needs "
                     f"{self.pipeline_model_parallel_size} entries (one per pipeline stage)")
        return e
