"""Megatron-style log lines, TensorBoard scalars, a JSONL metrics file (MFU yardstick: training/peak.py).

One line per `--log-interval` iterations on global rank 0 (the metrics are already reduced over
DP and broadcast from the last pipeline stage), e.g.

     iteration       11/      20 | consumed samples:           88 | lr: 3.000000E-04 | loss: 7.123456E+00 |
     grad norm: 1.234 | tokens/s: 1.2E+04 | MFU: 31.2% | step time (ms): 85.3 | peak mem (GB): 1.23 | ETA: 0:00:01

Loss, grad norm and step time are averages over the iterations since the last line (Megatron's
convention); the ETA uses the mean step time of the last max(log_interval, 32) iterations; tokens/s, MFU and TFLOP/s are the interval's work over its time (step-time weighted); skipped (non-finite) iterations are counted, not averaged. Every
iteration's metrics also go to TensorBoard (`--tensorboard-dir`) and, with `--log-file`, to
`<log_file>.jsonl` (what tests and `tools/plot_loss.py` read).
"""
from __future__ import annotations

import collections
import json
import math
import os
import resource
from pathlib import Path
from typing import Optional

import torch

from megatron_diffu.training.peak import measure_peak_flops  # noqa: F401  (moved; old import path)

ETA_STEPS = 32  # the ETA's step time is the mean over at least this many recent iterations


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is KiB on Linux: the process's peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class MetricsLogger:
    """Collects per-iteration metrics; prints an averaged line every `log_interval` iterations."""

    def __init__(self, train_iters: int, log_interval: int = 10, tensorboard_dir: Optional[str] = None,
                 log_file: Optional[str] = None, enabled: bool = True, global_batch_size: Optional[int] = None,
                 log_throughput: bool = False, log_timers_to_tensorboard: bool = False,
                 log_validation_ppl_to_tensorboard: bool = False):
        self.train_iters, self.log_interval, self.enabled = train_iters, log_interval, enabled
        self.global_batch_size = global_batch_size
        self.log_throughput, self.log_timers = log_throughput, log_timers_to_tensorboard
        self.log_validation_ppl = log_validation_ppl_to_tensorboard
        self.consumed_samples = 0
        self.window: list[dict] = []
        self.skipped = 0
        # step times of the last max(log_interval, ETA_STEPS) iterations, skipped ones included: the
        # ETA averages over them, not over one log window, because some stages alternate slow and fast
        # steps (GRPO rolls out once per num_iterations steps: with log_interval 1 a one-step window
        # swings the ETA between 4 minutes and 50)
        self.recent_step_times: collections.deque = collections.deque(maxlen=max(log_interval, ETA_STEPS))
        self.writer = None
        self.jsonl = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if enabled and log_file:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            self.log_file = Path(log_file)
            self.jsonl = open(str(log_file) + ".jsonl", "a", buffering=1)
        else:
            self.log_file = None

    def record(self, iteration: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.recent_step_times.append(float(metrics.get("step_time", 0.0)))
        if metrics.get("skipped"):
            self.skipped += 1
        else:
            self.window.append(metrics)
        self.consumed_samples = int(metrics.get("consumed_samples", self.consumed_samples))
        if self.writer is not None:
            for k, v in metrics.items():  # every metric (the diffusion-specific extras too) under train/
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.writer.add_scalar(f"train/{k}", float(v), iteration)
            self._megatron_scalars(iteration, metrics)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": iteration, **_plain(metrics)}) + "\n")
        if iteration % self.log_interval == 0 or iteration == self.train_iters:
            self._emit(iteration, metrics)

    def _scalar(self, name: str, value, iteration: int, vs_samples: bool = True) -> None:
        """Megatron's pair: `name` per iteration and `name vs samples` per consumed sample."""
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            return
        self.writer.add_scalar(name, float(value), iteration)
        if vs_samples:
            self.writer.add_scalar(f"{name} vs samples", float(value), self.consumed_samples)

    def _megatron_scalars(self, iteration: int, m: dict) -> None:
        """The scalars Megatron-LM's training_log writes, under its names (existing dashboards work):
        learning-rate, batch-size, lm loss, grad-norm (each also "vs samples"); iteration-time with
        --log-timers-to-tensorboard, throughput (TFLOP/s/GPU) with that and --log-throughput."""
        self._scalar("learning-rate", m.get("lr"), iteration)
        self._scalar("batch-size", self.global_batch_size, iteration)
        if not m.get("skipped"):
            self._scalar("lm loss", m.get("loss"), iteration)
        self._scalar("grad-norm", m.get("grad_norm"), iteration)
        if self.log_timers:
            self._scalar("iteration-time", m.get("step_time"), iteration, vs_samples=False)
            if self.log_throughput:
                self._scalar("throughput", m.get("tflops_per_gpu"), iteration, vs_samples=False)

    def _emit(self, iteration: int, last: dict) -> None:
        w = self.window or [last]
        avg = lambda k: sum(float(m.get(k, 0.0)) for m in w) / len(w)  # noqa: E731
        time_s = sum(float(m.get("step_time", 0.0)) for m in w)

        def rate(k: str) -> float:
            # a rate over the interval is work / time (as Megatron's elapsed-time throughput), i.e. the
            # step-time-weighted mean of the per-step rates; the plain mean of ratios overstates it
            # whenever step times vary (one fast step among slow ones counts as much as each slow one)
            if time_s <= 0.0:
                return avg(k)
            return sum(float(m.get(k, 0.0)) * float(m.get("step_time", 0.0)) for m in w) / time_s
        line = (f" iteration {iteration:>8d}/{self.train_iters:>8d} | consumed samples: {int(last['consumed_samples']):>12d} "
                f"| lr: {last['lr']:.6E} | loss: {avg('loss'):.6E} | grad norm: {avg('grad_norm'):.3f} "
                f"| tokens/s: {rate('tokens_per_s'):.4g} | MFU: {100 * rate('mfu'):.2f}% "
                f"| step time (ms): {1000 * avg('step_time'):.1f} | peak mem (GB): {last.get('peak_mem_gb', 0.0):.2f}")
        if self.log_throughput:
            line += f" | throughput per GPU (TFLOP/s/GPU): {rate('tflops_per_gpu'):.1f}"
        if self.skipped:
            line += f" | skipped iterations: {self.skipped}"
        if iteration < self.train_iters:  # training steps only: evaluation and checkpoint time come on top
            recent = sum(self.recent_step_times) / max(1, len(self.recent_step_times))
            line += f" | ETA: {_hms((self.train_iters - iteration) * recent)}"
        self._print(line)
        self.window, self.skipped = [], 0

    def log_validation(self, iteration: int, metrics: dict) -> None:
        """Validation metrics: all of them under valid/; the loss (`elbo_loss`, the diffusion ELBO bound,
        or `loss`) also as Megatron's "lm loss validation" (+ vs samples), and its perplexity
        exp(min(20, loss)) as "lm loss validation ppl" with --log-validation-ppl-to-tensorboard."""
        if not self.enabled:
            return
        body = " | ".join(f"{k}: {v:.6E}" for k, v in metrics.items())
        self._print(f" validation at iteration {iteration:>8d} | {body}")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"valid/{k}", float(v), iteration)
            loss = metrics.get("elbo_loss", metrics.get("loss"))
            if isinstance(loss, (int, float)) and math.isfinite(float(loss)):
                self._scalar("lm loss validation", loss, iteration)
                if self.log_validation_ppl:
                    self._scalar("lm loss validation ppl", math.exp(min(20.0, float(loss))), iteration)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": iteration, "validation": _plain(metrics)}) + "\n")

    def _print(self, line: str) -> None:
        print(line, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(line + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds)) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _plain(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
    return out


def rank0_print(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)
