"""The training part's config sections (field names = Megatron argument names): the optimizer and
LR schedule, the loop, checkpoints, logging. Run configs (stages/) compose them with the other
parts' sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from megatron_diffu.config import SectionConfig


EXIT_SIGNALS = ("SIGTERM", "SIGUSR1")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "wsd", "inverse-square-root")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class OptimizerConfig(SectionConfig):
    optimizer: str = "adam"  # AdamW (decoupled weight decay), Megatron's --optimizer adam
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0  # with --train-samples: warm-up counted in samples
    lr_warmup_fraction: Optional[float] = None  # warm-up = this fraction of the decay length
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_samples: Optional[int] = None  # with --train-samples; None: train_samples
    lr_wsd_decay_style: str = "linear"
    lr_wsd_decay_iters: Optional[int] = None  # WSD: length of the final decay phase
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    fused_adam: Optional[bool] = None  # None: torch's fused AdamW kernel for bf16 models, the per-op formula for fp32

    FLAG_HELP: ClassVar[dict] = {
        "optimizer": "optimizer: adam = AdamW (decoupled weight decay), as Megatron's --optimizer adam",
        "lr": "peak learning rate", "min_lr": "learning rate floor of the decay",
        "lr_warmup_iters": "linear warm-up iterations (the step at iteration i uses lr(i): the first step has "
                           "lr/warmup, Megatron's has 0)",
        "lr_warmup_samples": "warm-up in samples (with --train-samples; = samples / global batch iterations)",
        "lr_warmup_fraction": "warm-up as a fraction of the decay length (--lr-decay-iters/samples or the run)",
        "lr_warmup_init": "learning rate the warm-up starts from",
        "lr_decay_style": "decay after warm-up: constant, linear, cosine, wsd, inverse-square-root",
        "lr_decay_iters": "iterations to decay over (none: the run's --train-iters)",
        "lr_decay_samples": "samples to decay over (with --train-samples; none: the run's --train-samples)",
        "lr_wsd_decay_style": "shape of the WSD annealing phase", "lr_wsd_decay_iters": "length of the WSD annealing",
        "weight_decay": "AdamW weight decay (not on norms and biases)", "adam_beta1": "Adam beta1",
        "adam_beta2": "Adam beta2", "adam_eps": "Adam epsilon", "clip_grad": "global gradient-norm clip (0: off)",
        "fused_adam": "torch's fused AdamW kernel (faster; differs from the per-op formula by 1 ulp on ~1e-4 of "
                      "the elements per step); unset: fused for bf16 models, per-op for fp32",
    }
    MEGATRON_DEFAULTS: ClassVar[dict] = {
        "lr": (None, "a runnable default (Megatron requires --lr)"),
        "lr_decay_style": ("linear", "DiffuCoder's and Dream's recipes decay with cosine"),
        "lr_wsd_decay_style": ("exponential", "linear is the common WSD annealing choice"),
    }

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
        if self.lr_warmup_iters < 0 or self.lr_warmup_samples < 0:
            e.append(f"optimizer: lr_warmup_iters ({self.lr_warmup_iters}) and lr_warmup_samples "
                     f"({self.lr_warmup_samples}) must be >= 0")
        if self.lr_warmup_fraction is not None:
            if not 0 <= self.lr_warmup_fraction <= 1:
                e.append(f"optimizer.lr_warmup_fraction={self.lr_warmup_fraction} must be in [0, 1]")
            if self.lr_warmup_iters or self.lr_warmup_samples:
                e.append("optimizer: set only one of --lr-warmup-fraction, --lr-warmup-iters, --lr-warmup-samples "
                         "(Megatron's rule)")
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
    exit_signal: str = "SIGTERM"  # Megatron's signal choice; both SIGTERM and SIGUSR1 are always handled
    exit_interval: Optional[int] = None  # exit (saving first) once the iteration is divisible by this
    exit_duration_in_mins: Optional[float] = None  # exit (saving first) after this many minutes of training
    max_skipped_steps: int = 10  # consecutive non-finite steps before giving up
    empty_unused_memory_level: int = 0

    FLAG_HELP: ClassVar[dict] = {
        "micro_batch_size": "sequences per micro-batch and data-parallel rank",
        "global_batch_size": "sequences per iteration (none: micro batch x data-parallel size)",
        "train_iters": "iterations to train (or --train-samples)", "train_samples": "samples to train (or --train-iters)",
        "eval_interval": "validate every N iterations (0: never)", "eval_iters": "validation micro-batch rounds",
        "exit_signal_handler": "on SIGTERM/SIGUSR1: save a checkpoint and exit with 75 (requeue)",
        "exit_signal": "the signal Megatron's handler waits for; ours always handles SIGTERM and SIGUSR1",
        "exit_interval": "save and exit once the iteration is divisible by N",
        "exit_duration_in_mins": "save and exit after this many minutes of training",
        "max_skipped_steps": "consecutive non-finite steps (skipped updates) before giving up",
        "empty_unused_memory_level": "accepted for Megatron compatibility (no effect)",
    }
    MEGATRON_DEFAULTS: ClassVar[dict] = {
        "micro_batch_size": (None, "a runnable default"),
        "eval_iters": (100, "the tiny CPU runs validate on fewer rounds; pass --eval-iters 100 for Megatron's"),
        "exit_signal_handler": (False, "SLURM preemption (--signal=USR1) then resumes without losing work"),
    }

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
        if self.exit_signal not in EXIT_SIGNALS:
            e.append(f"training.exit_signal={self.exit_signal!r}: the handler (training/signals.py) catches "
                     f"{' and '.join(EXIT_SIGNALS)} (SLURM's --signal=USR1 requeue), always both; choose one of them")
        if self.exit_interval is not None and self.exit_interval < 1:
            e.append(f"training.exit_interval={self.exit_interval} must be >= 1")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            e.append(f"training.exit_duration_in_mins={self.exit_duration_in_mins} must be > 0")
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
    no_save_rng: bool = False
    save_retain_interval: Optional[int] = None  # Megatron's: also keep every checkpoint whose iteration is a multiple

    FLAG_HELP: ClassVar[dict] = {
        "save": "directory to save checkpoints to", "load": "checkpoint to resume from (save dir or iter_* dir)",
        "save_interval": "save every N iterations", "keep_last": "keep the N newest checkpoints (none: all)",
        "finetune": "load model weights only; iteration, optimizer and data position restart",
        "no_load_optim": "load without the optimizer state (fresh Adam moments)",
        "no_load_rng": "load without the RNG state", "no_save_optim": "save without the optimizer state",
        "no_save_rng": "save without the RNG state (a resume then draws fresh RNG streams; the diffusion noise "
                       "is keyed by sample index and does not depend on it)",
        "save_retain_interval": "also keep every checkpoint whose iteration is a multiple of N (when pruning "
                                "to --keep-last); with --keep-last 1 exactly Megatron's retention",
    }
    MEGATRON_DEFAULTS: ClassVar[dict] = {
        "keep_last": (None, "Megatron keeps every checkpoint unless --save-retain-interval is given; 3 bounds "
                            "the disk a long run uses"),
    }

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
        if self.save_retain_interval is not None and self.save_retain_interval < 1:
            e.append(f"checkpoint.save_retain_interval={self.save_retain_interval} must be >= 1 (or none)")
        return e


@dataclass
class LoggingConfig(SectionConfig):
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    log_file: Optional[str] = None  # also append the log lines (rank 0) to this file; JSONL metrics beside it
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None: measured (CPU) / known (GPU)
    log_throughput: bool = False  # add "throughput per GPU (TFLOP/s/GPU)" to the log line (Megatron's)
    log_timers_to_tensorboard: bool = False  # TensorBoard: iteration-time (and throughput with --log-throughput)
    log_validation_ppl_to_tensorboard: bool = False  # TensorBoard: "lm loss validation ppl" (Megatron's flag)

    FLAG_HELP: ClassVar[dict] = {
        "log_interval": "print one averaged log line every N iterations",
        "tensorboard_dir": "write TensorBoard scalars (Megatron's names: lm loss, learning-rate, grad-norm, ...)",
        "log_file": "also append the log lines to this file (and JSONL metrics to FILE.jsonl)",
        "peak_flops": "per-device peak FLOP/s for MFU (none: measured on CPU / known for the GPU)",
        "log_throughput": "add 'throughput per GPU (TFLOP/s/GPU)' to the log line",
        "log_timers_to_tensorboard": "TensorBoard: iteration-time (and throughput with --log-throughput)",
        "log_validation_ppl_to_tensorboard": "TensorBoard: 'lm loss validation ppl' (+ vs samples)",
    }
    MEGATRON_DEFAULTS: ClassVar[dict] = {
        "log_interval": (100, "the CPU runs are a few hundred iterations long"),
    }

    def problems(self) -> list[str]:
        return [] if self.log_interval >= 1 else [f"logging.log_interval={self.log_interval} must be >= 1"]
