"""The training part's config sections (field names = Megatron argument names): the optimizer and
LR schedule, the loop, checkpoints, logging. Run configs (stages/) compose them with the other
parts' sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_diffu.config import SectionConfig


LR_DECAY_STYLES = ("constant", "linear", "cosine", "wsd", "inverse-square-root")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class OptimizerConfig(SectionConfig):
    optimizer: str = "adam"  # AdamW (decoupled weight decay), Megatron's --optimizer adam
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_wsd_decay_style: str = "linear"
    lr_wsd_decay_iters: Optional[int] = None  # WSD: length of the final decay phase
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping

    def problems(self) -> list[str]:
        e = []
        if self.optimizer != "adam":
            e.append(f"optimizer.optimizer={self.optimizer!r}: only 'adam' (AdamW) is implemented")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            e.append(f"optimizer.lr_decay_style={self.lr_decay_style!r}: choose one of {LR_DECAY_STYLES}")
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            e.append(f"optimizer.lr_wsd_decay_style={self.lr_wsd_decay_style!r}: choose one of {WSD_DECAY_STYLES}")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            e.append(f"optimizer: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        if self.lr_warmup_iters < 0:
            e.append(f"optimizer.lr_warmup_iters={self.lr_warmup_iters} must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_eps <= 0:
            e.append("optimizer: adam_beta1/adam_beta2 must be in [0, 1) and adam_eps > 0")
        if self.clip_grad < 0 or self.weight_decay < 0:
            e.append("optimizer: clip_grad and weight_decay must be >= 0")
        return e


@dataclass
class TrainingConfig(SectionConfig):
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: micro_batch_size * data-parallel size
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None  # alternative to train_iters (converted at start-up)
    eval_interval: int = 1000  # 0 disables validation
    eval_iters: int = 10  # validation micro-batch rounds per evaluation
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1 -> checkpoint then exit (training/signals.py)
    exit_interval: Optional[int] = None  # stop after this iteration (saving first)
    max_skipped_steps: int = 10  # consecutive non-finite steps before giving up
    empty_unused_memory_level: int = 0

    def problems(self) -> list[str]:
        e = []
        if self.micro_batch_size < 1:
            e.append(f"training.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.train_iters is None and self.train_samples is None:
            e.append("training: set --train-iters or --train-samples")
        if self.train_iters is not None and self.train_samples is not None:
            e.append("training: set only one of --train-iters and --train-samples")
        if self.eval_interval < 0 or self.eval_iters < 0 or self.max_skipped_steps < 1:
            e.append("training: eval_interval, eval_iters must be >= 0 and max_skipped_steps >= 1")
        return e


@dataclass
class CheckpointConfig(SectionConfig):
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: Optional[int] = 3  # None: keep every checkpoint
    finetune: bool = False  # load model weights only; iteration/optimizer/data position restart
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False

    def problems(self) -> list[str]:
        e = []
        if self.save_interval is not None and self.save_interval < 1:
            e.append(f"checkpoint.save_interval={self.save_interval} must be >= 1")
        if self.save_interval is not None and not self.save:
            e.append("checkpoint: --save-interval needs --save DIR")
        if self.keep_last is not None and self.keep_last < 1:
            e.append(f"checkpoint.keep_last={self.keep_last} must be >= 1 (or none to keep all)")
        if self.finetune and not self.load:
            e.append("checkpoint: --finetune needs --load DIR (the checkpoint to start from)")
        return e


@dataclass
class LoggingConfig(SectionConfig):
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    log_file: Optional[str] = None  # also append the log lines (rank 0) to this file; JSONL metrics beside it
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None: measured (CPU) / known (GPU)

    def problems(self) -> list[str]:
        return [] if self.log_interval >= 1 else [f"logging.log_interval={self.log_interval} must be >= 1"]
