"""The one training loop. Stages (stages/: diffusion pretraining and SFT, coupled-GRPO) plug in
through the `Stage` interface; this module knows nothing of any stage.

    grid = build_grid(cfg)                         # after init_distributed()
    trainer = Trainer(cfg, stage, grid)
    trainer.train()                                # -> exit code (0, or EXIT_CODE_SIGNAL after a signal save)

One global step (`Trainer.train_step`):
1. `stage.step_inputs(trainer) -> StepInputs`: this DP rank's `num_micro_batches` micro-batches
   (dicts of tensors; every pipeline stage gets the same list) and `info`, what the stage learnt
   making them (GRPO: rollout statistics and timings).
2. `megatron_diffu.parallel.pipeline.forward_backward(stage.forward_step, model, micro_batches, grid)`:
   1F1B over the pipeline (or plain accumulation). `stage.forward_step(model, batch, input_tensor)
   -> (output, loss_fn)`, `loss_fn(output) -> (loss_for_backward, report)`.
   **Normalisation contract**: gradients are SUMMED over micro-batches and data-parallel ranks,
   so a stage's loss_for_backward must already be divided by its *global-batch* normaliser.
   `report` is a dict of scalars that are *sums* (e.g. loss_sum, num_tokens): the trainer adds
   them over micro-batches and DP ranks.
3. `stage.step_report(trainer, inputs, totals) -> StepReport(metrics, tokens, flops)`: the log
   values (must include "loss") and what the step processed, returned, never stored on the stage.
4. Gradients: fp32 accumulation, SP/tied-embedding/DP reductions, global norm (TP/PP-aware), clip,
   AdamW with fp32 master weights (training/optimizer.py), LR from training/lr_schedule.py.
   A non-finite loss or gradient norm skips the update (logged); `max_skipped_steps` in a row
   raise `TrainingError`.
5. `stage.on_step_end(trainer, metrics)` (GRPO: reference sync), logging, periodic validation
   (`stage.validate(trainer) -> dict`), periodic checkpoint; signal/exit-interval handling.
`trainer.phase_timer = PhaseTimer(device)` records each step's seconds per phase (off by default;
benchmarks/pretrain_throughput.py prints the breakdown).

State the trainer checkpoints: model, optimizer, iteration, consumed samples (the data position),
RNG, `stage.state_dict()` (a picklable dict), and the stage's extra model states
(`stage.checkpoint_states(trainer)`, e.g. GRPO's reference policy: objects with
`sharded_state_dict()` saved and resharded like the model).

Construction order: `stage.configure(cfg, world_size)` (tokenizer-dependent config) before the
trainer; the trainer builds the model and optimizer, asks the stage for its extra states, loads
`--load`, then calls `stage.setup(trainer)` (data positioned at `trainer.consumed_samples`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_diffu.parallel.state import ProcessGrid, group_size
from megatron_diffu.training import checkpointing
from megatron_diffu.training.logging import MetricsLogger, measure_peak_flops, peak_memory_gb
from megatron_diffu.training.lr_schedule import LRSchedule
from megatron_diffu.training.optimizer import MixedPrecisionAdamW
from megatron_diffu.training.signals import EXIT_CODE_SIGNAL, ExitSignalHandler

from megatron_diffu.model.builder import build_model_shard
from megatron_diffu.parallel.pipeline import forward_backward


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


# ------------------------------------------------------------------------------------ Stage
@dataclass
class StepInputs:
    """A step's micro-batches and what the stage learnt making them (logged with the step)."""

    micro_batches: list[dict]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepReport:
    """What a step computed: log values (must include "loss"), tokens processed, matmul FLOPs."""

    metrics: dict[str, float]
    tokens: float
    flops: float


class Stage:
    """What differs between stages. Subclass and override; the defaults are no-ops.

    Everything a method needs comes through the `trainer` argument (`trainer.cfg`, `.grid`,
    `.model`, `.iteration`, `.consumed_samples`, `.global_batch_size`, `.micro_batch_size`,
    `.num_micro_batches`, `.device`).
    """

    name = "stage"

    def configure(self, cfg, world_size: int) -> None:
        """Before the model is built: resolve tokenizer-dependent config (vocab size, mask id)."""

    def checkpoint_states(self, trainer: "Trainer") -> dict[str, Any]:
        """Extra model states the checkpointer saves and restores like the model (built before
        `--load` is read): {name: object with sharded_state_dict()}."""
        return {}

    def setup(self, trainer: "Trainer") -> None:
        """Build data iterators positioned at `trainer.consumed_samples` (resume)."""

    def step_inputs(self, trainer: "Trainer") -> StepInputs:
        raise NotImplementedError

    def forward_step(self, model, batch: dict, input_tensor: Optional[torch.Tensor]):
        """Pipeline forward step: (output, loss_fn); see the module docstring."""
        raise NotImplementedError

    def step_report(self, trainer: "Trainer", inputs: StepInputs, totals: dict[str, float]) -> StepReport:
        raise NotImplementedError

    def validate(self, trainer: "Trainer") -> dict[str, float]:
        return {}

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None:
        """Called on every rank after each step (GRPO: reference-model sync)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ------------------------------------------------------------------------------------ helpers
def build_grid(cfg) -> ProcessGrid:
    """The process grid for the config (one process without torch.distributed -> single())."""
    if not (dist.is_available() and dist.is_initialized()):
        p = cfg.parallel
        if p.tensor_model_parallel_size * p.pipeline_model_parallel_size != 1:
            raise ValueError("tensor/pipeline parallelism needs several processes: launch with torchrun "
                             "--nproc-per-node N python -m megatron_diffu.pretrain ...")
        return ProcessGrid.single()
    return ProcessGrid.build(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)


def default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_available() and dist.is_initialized() and \
            "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.is_available() and not (dist.is_available() and dist.is_initialized()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_model(cfg, grid: ProcessGrid, device: Optional[torch.device] = None):
    """This rank's pipeline stage / TP shard of the run config's model."""
    return build_model_shard(cfg.model, grid, split=cfg.parallel.pipeline_model_parallel_split,
                             sequence_parallel=cfg.parallel.sequence_parallel, device=device)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def keep_large_host_blocks() -> bool:
    """CPU training: let glibc serve large blocks from its heap and keep freed ones (instead of a
    fresh mmap per allocation above 32 MB, page-faulted in at every touch: the [V, H] embedding and
    head gradients, ~100 MB each at 100M, cost ~50 ms a step that way). Process-wide; numerics
    unchanged; MDIFFU_HOST_MALLOC_TUNING=0 turns it off. Returns whether it was applied."""
    import os
    import sys
    if os.environ.get("MDIFFU_HOST_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


class PhaseTimer:
    """Per-phase wall time of `Trainer.train_step` (off unless `trainer.phase_timer` is set: the
    hot path then pays one `is None` test per phase). `mark(name)` charges the time since the
    previous mark to `name` (device-synchronised first, so CUDA work lands in its own phase);
    `last` holds the seconds of the latest step. The trainer marks batch, forward_backward
    (whatever the stage did not mark itself inside the schedule: its backward when the stage marks
    noise/forward/loss), report, grad_reduce, grad_norm, optimizer (clip + AdamW + param sync),
    step_end."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device or "cpu")
        self.last: dict[str, float] = {}
        self._t = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.last = {}
        self._sync()
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.last[name] = self.last.get(name, 0.0) + now - self._t
        self._t = now


# ------------------------------------------------------------------------------------ Trainer
class Trainer:
    def __init__(self, cfg, stage: Stage, grid: Optional[ProcessGrid] = None, device: Optional[torch.device] = None,
                 model=None):
        self.cfg, self.stage = cfg, stage
        self.grid = grid or build_grid(cfg)
        self.device = device or default_device()
        world = self.grid.world_size
        cfg.validate(world)
        self.global_batch_size = cfg.resolved_global_batch_size(world)
        self.micro_batch_size = cfg.training.micro_batch_size
        self.num_micro_batches = cfg.num_micro_batches(world)
        self.train_iters = cfg.resolved_train_iters(world)
        if self.device.type == "cpu":
            keep_large_host_blocks()
        self.model = model if model is not None else build_model(cfg, self.grid, self.device)
        self.optimizer = MixedPrecisionAdamW(self.model, cfg.optimizer, self.grid, cfg.parallel.use_distributed_optimizer,
                                             fused=getattr(cfg.optimizer, "fused_adam", None),
                                             gradient_accumulation_fusion=cfg.parallel.gradient_accumulation_fusion)
        self.lr_schedule = LRSchedule.from_config(cfg.optimizer, self.train_iters, self.global_batch_size)
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_in_a_row = 0
        self.history: list[dict] = []
        self.validation_history: list[tuple[int, dict]] = []
        self.extra_states = dict(stage.checkpoint_states(self))
        self.restored_states: set[str] = set()  # extra states found in the loaded checkpoint
        self._maybe_load()
        lg = cfg.logging
        self.logger = MetricsLogger(self.train_iters, lg.log_interval, lg.tensorboard_dir, lg.log_file,
                                    enabled=self.grid.rank == 0, global_batch_size=self.global_batch_size,
                                    log_throughput=lg.log_throughput, log_timers_to_tensorboard=lg.log_timers_to_tensorboard,
                                    log_validation_ppl_to_tensorboard=lg.log_validation_ppl_to_tensorboard)
        self._peak_flops: Optional[float] = cfg.logging.peak_flops
        self.phase_timer: Optional[PhaseTimer] = None  # set one to time train_step's phases
        self.stage.setup(self)

    # ------------------------------------------------------------------ checkpoints
    def _maybe_load(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        if not checkpointing.has_checkpoint(ck.load):
            if ck.finetune:
                raise checkpointing.CheckpointError(f"--finetune: no checkpoint found at --load {ck.load}")
            if self.grid.rank == 0:
                print(f"[checkpoint] no checkpoint at {ck.load}: starting from scratch", flush=True)
            return
        state = checkpointing.load_checkpoint(ck.load, self.model, self.optimizer, self.grid, self.cfg.model,
                                              finetune=ck.finetune, load_optim=not ck.no_load_optim,
                                              load_rng=not ck.no_load_rng, states=self.extra_states)
        if state is None:  # finetune: weights only
            return
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.restored_states = set(state.get("restored_states", ()))
        if ck.no_load_optim:
            self.optimizer.step_count = 0
        self.stage.load_state_dict(state.get("stage", {}))

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        state = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                 "optimizer_step": self.optimizer.step_count, "lr_schedule": self.lr_schedule.state_dict(),
                 "stage": self.stage.state_dict(), "stage_name": self.stage.name}
        checkpointing.save_checkpoint(ck.save, self.iteration, self.model, self.optimizer, self.grid, self.cfg,
                                      state, keep_last=ck.keep_last, save_optim=not ck.no_save_optim,
                                      states=self.extra_states, save_rng=not ck.no_save_rng,
                                      retain_interval=ck.save_retain_interval)

    # ------------------------------------------------------------------ reductions
    def reduce_reports(self, reports: list[dict]) -> dict[str, float]:
        """Sum the last stage's reports over micro-batches and DP; share with every pipeline stage."""
        totals: dict[str, float] = {}
        if self.grid.is_last_stage:
            keys = sorted({k for r in reports for k in r})
            # device values come to the host in one transfer (not one sync each); summed in Python
            # over micro-batches in order, as before
            flat = [r.get(k, 0.0) for r in reports for k in keys]
            on_dev = [v for v in flat if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
            if on_dev:
                host = iter(torch.stack([v.detach().reshape(()).double() for v in on_dev]).tolist())
                flat = [next(host) if isinstance(v, torch.Tensor) and v.device.type != "cpu" else v for v in flat]
            n = len(keys)
            vec = torch.tensor([sum(float(flat[i * n + j]) for i in range(len(reports))) for j in range(n)],
                               dtype=torch.float64)
            if group_size(self.grid.dp_group) > 1:
                vec = vec.to(self.device)
                dist.all_reduce(vec, group=self.grid.dp_group)
            totals = dict(zip(keys, vec.cpu().tolist()))
        if self.grid.pp_size > 1:
            box = [totals]
            dist.broadcast_object_list(box, src=self.grid.pp_ranks[-1], group=self.grid.pp_group)
            totals = box[0]
        return totals

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        timer = self.phase_timer
        if timer is not None:
            timer.start()
        t0 = time.perf_counter()
        self.iteration += 1
        self.model.train()
        inputs = self.stage.step_inputs(self)
        micro_batches = inputs.micro_batches
        if len(micro_batches) != self.num_micro_batches:
            raise TrainingError(f"stage {self.stage.name} produced {len(micro_batches)} micro-batches, expected "
                                f"{self.num_micro_batches} (global_batch_size / (micro_batch_size * dp))")
        if timer is not None:
            timer.mark("batch")
        self.optimizer.zero_grad()
        if timer is not None:
            timer.mark("zero_grad")
        reports = forward_backward(self.stage.forward_step, self.model, micro_batches, self.grid,
                                   dtype=self.cfg.model.params_dtype)
        if timer is not None:
            timer.mark("forward_backward")
        report = self.stage.step_report(self, inputs, self.reduce_reports(reports))
        metrics = dict(report.metrics)
        if timer is not None:
            timer.mark("report")
        self.optimizer.reduce_gradients()
        if timer is not None:
            timer.mark("grad_reduce")
        grad_norm = self.optimizer.grad_norm()
        if timer is not None:
            timer.mark("grad_norm")
        lr = self.lr_schedule(self.iteration)
        loss = float(metrics.get("loss", float("nan")))
        skipped = not (_finite(loss) and _finite(grad_norm))
        if skipped:
            self.skipped_in_a_row += 1
            if self.grid.rank == 0:
                print(f"[trainer] iteration {self.iteration}: non-finite {'loss' if not _finite(loss) else 'gradient'} "
                      f"(loss={loss}, grad norm={grad_norm}): update skipped "
                      f"({self.skipped_in_a_row}/{self.cfg.training.max_skipped_steps} in a row)", flush=True)
            self.optimizer.zero_grad()
            if self.skipped_in_a_row >= self.cfg.training.max_skipped_steps:
                raise TrainingError(f"{self.skipped_in_a_row} non-finite steps in a row (max_skipped_steps="
                                    f"{self.cfg.training.max_skipped_steps}) at iteration {self.iteration}: lower --lr, "
                                    f"check the data, or resume from the last checkpoint")
        else:
            self.skipped_in_a_row = 0
            self.optimizer.step(lr, grad_norm)
        if timer is not None:
            timer.mark("optimizer")
        self.consumed_samples += self.global_batch_size
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        metrics.update(iteration=self.iteration, consumed_samples=self.consumed_samples, lr=lr, grad_norm=grad_norm,
                       skipped=skipped, step_time=dt, tokens_per_s=report.tokens / dt,
                       mfu=report.flops / dt / (self.peak_flops() * self.grid.world_size),
                       tflops_per_gpu=report.flops / dt / self.grid.world_size / 1e12,
                       peak_mem_gb=peak_memory_gb(self.device))
        if timer is not None:
            timer.mark("step_end")
        return metrics

    def peak_flops(self) -> float:
        if self._peak_flops is None:
            self._peak_flops = measure_peak_flops(self.device, self.cfg.model.params_dtype)
        return self._peak_flops

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad():
            metrics = self.stage.validate(self)
        self.model.train()
        if metrics:
            self.validation_history.append((self.iteration, metrics))
            self.logger.log_validation(self.iteration, metrics)
        return metrics

    # ------------------------------------------------------------------ loop
    def _out_of_time(self, started: float) -> bool:
        """--exit-duration-in-mins: one decision for all ranks (MAX of their clocks), as Megatron."""
        mins = self.cfg.training.exit_duration_in_mins
        if not mins:
            return False
        done = torch.tensor([float((time.time() - started) / 60.0 > mins)], device=self.device)
        if dist.is_available() and dist.is_initialized() and self.grid.world_size > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MAX)
        if bool(done.item()) and self.grid.rank == 0:
            print(f"[trainer] exiting after {mins} minutes (--exit-duration-in-mins) at iteration {self.iteration}",
                  flush=True)
        return bool(done.item())

    def train(self) -> int:
        """Run to train_iters (or a signal / exit_interval). Returns the process exit code."""
        t, ck = self.cfg.training, self.cfg.checkpoint
        handler = ExitSignalHandler(device=self.device if self.device.type == "cuda" else None)
        if self.grid.rank == 0:
            print(f"[trainer] {self.stage.name}: iterations {self.iteration + 1}..{self.train_iters}, global batch "
                  f"{self.global_batch_size} = {self.micro_batch_size} x {self.num_micro_batches} micro x "
                  f"{self.grid.dp_size} DP (tp={self.grid.tp_size}, pp={self.grid.pp_size})", flush=True)
        exit_code = 0
        started = time.time()
        with handler if t.exit_signal_handler else contextlib.nullcontext():
            try:
                while self.iteration < self.train_iters:
                    metrics = self.train_step()
                    self.history.append(metrics)
                    self.logger.record(self.iteration, metrics)
                    self.stage.on_step_end(self, metrics)
                    if t.eval_interval and t.eval_iters and self.iteration % t.eval_interval == 0:
                        self.evaluate()
                    saved = False
                    if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                        self.save()
                        saved = True
                    if t.exit_signal_handler and handler.should_exit():
                        if not saved:
                            self.save()
                        if self.grid.rank == 0:
                            print(f"[trainer] exiting after a signal at iteration {self.iteration} with code "
                                  f"{EXIT_CODE_SIGNAL} (checkpoint {'saved' if ck.save else 'NOT saved: no --save'})",
                                  flush=True)
                        return EXIT_CODE_SIGNAL
                    if (t.exit_interval and self.iteration % t.exit_interval == 0) or self._out_of_time(started):
                        if not saved:
                            self.save()
                        return 0
                if ck.save and self.history and (not ck.save_interval or self.iteration % ck.save_interval):
                    self.save()
            finally:
                self.logger.close()
        return exit_code
