"""The sections every training stage shares, and the batch arithmetic derived from them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

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

    # --help text of the flags of the sections other parts own (training/config.py documents its own)
    EXTRA_FLAG_HELP: ClassVar[dict] = {
        "num_layers": "transformer layers", "hidden_size": "hidden size", "ffn_hidden_size": "SwiGLU FFN size",
        "num_attention_heads": "query heads", "num_query_groups": "key/value heads (GQA groups)",
        "max_position_embeddings": "longest sequence the model is built for (RoPE positions)",
        "rotary_base": "RoPE theta", "vocab_size": "embedding rows (padded vocabulary)",
        "untie_embeddings_and_output_weights": "separate input embedding and output head",
        "bf16": "train in bfloat16 (fp32 master weights)",
        "recompute_granularity": "activation recomputation: full / selective (none: off)",
        "recompute_num_layers": "with full recompute: the first N layers of each pipeline stage (Megatron's block)",
        "tensor_model_parallel_size": "tensor-parallel size", "pipeline_model_parallel_size": "pipeline stages",
        "sequence_parallel": "sequence parallelism in the TP region",
        "data_path": "dataset prefixes (PREFIX, or weights and prefixes: 0.7 A 0.3 B)",
        "split": "train,valid,test split weights", "seq_length": "sequence length",
        "tokenizer_type": "HuggingFaceTokenizer (default: the Qwen2.5/Dream tokenizer) or SentencePieceTokenizer",
        "tokenizer_model": "tokenizer.json / .model path", "seed": "random seed",
        "fp8_no_grad": "run the no-grad passes (evaluation, GRPO old/reference log-probs) in FP8 too "
                       "(default: bf16; the sampler is never FP8)",
    }

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
        e.extend(self._schedule_unit_problems())
        seq = self.data.seq_length
        if seq > self.model.max_position_embeddings:
            e.append(f"data.seq_length={seq} exceeds model.max_position_embeddings={self.model.max_position_embeddings}")
        if p.sequence_parallel and seq % p.tensor_model_parallel_size:
            e.append(f"--sequence-parallel needs seq_length ({seq}) divisible by tensor_model_parallel_size "
                     f"({p.tensor_model_parallel_size})")
        e.extend(self.fp8_shape_problems())
        return e

    # ------------------------------------------------------------------ FP8 shapes
    def fp8_lengths(self) -> list[tuple[str, int]]:
        """(config field, sequence length) of every micro-batch length the stage's FP8 passes use
        (training, and evaluation when model.fp8_no_grad); stages with more lengths extend it."""
        return [("data.seq_length", self.data.seq_length)]

    def fp8_shape_problems(self) -> list[str]:
        """FP8 runs: every micro-batch's rows x length tokens meet the GEMM rule (model/fp8_shapes.py);
        the model sizes are the model section's check."""
        from megatron_diffu.model.fp8_shapes import length_problems
        p, mbs = self.parallel, self.training.micro_batch_size
        return length_problems(self.model, p.tensor_model_parallel_size, p.sequence_parallel, mbs,
                               f"training.micro_batch_size={mbs}", self.fp8_lengths())

    def _schedule_unit_problems(self) -> list[str]:
        """Megatron's rule: a run counted in iterations sets its LR lengths in iterations, one counted in
        samples sets them in samples."""
        o, t = self.optimizer, self.training
        if t.train_iters is not None and (o.lr_decay_samples is not None or o.lr_warmup_samples):
            return ["optimizer: with --train-iters set the LR schedule in iterations (--lr-decay-iters, "
                    "--lr-warmup-iters or --lr-warmup-fraction), not --lr-decay-samples/--lr-warmup-samples"]
        if t.train_samples is not None and (o.lr_decay_iters is not None or o.lr_warmup_iters):
            return ["optimizer: with --train-samples set the LR schedule in samples (--lr-decay-samples, "
                    "--lr-warmup-samples or --lr-warmup-fraction), not --lr-decay-iters/--lr-warmup-iters"]
        return []
