"""Learning-rate schedule: linear warm-up, then constant / linear / cosine / WSD / inverse-sqrt decay.

Megatron's `OptimizerParamScheduler` formulas, counted in iterations. Decision: the step taken
at iteration i (1-based) uses lr(i), so with warm-up the first step has lr = lr * 1/warmup rather
than Megatron's 0 (a zero first step only wastes a batch).

- warm-up (i <= lr_warmup_iters): lr_warmup_init + (lr - lr_warmup_init) * i / lr_warmup_iters
- after lr_decay_iters: min_lr
- linear: min + (lr - min) * (1 - r); cosine: min + (lr - min) * (cos(pi r) + 1) / 2,
  r = (i - warmup) / (decay_iters - warmup)
- wsd (warmup-stable-decay): lr until decay_iters - lr_wsd_decay_iters, then the
  `lr_wsd_decay_style` shape (linear, cosine, exponential 2*0.5^r - 1, minus_sqrt 1 - sqrt r)
  from lr to min_lr over the last lr_wsd_decay_iters
- inverse-square-root: lr * sqrt(max(warmup, 1) / i), floored at min_lr
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class LRSchedule:
    lr: float
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_init: float = 0.0
    decay_style: str = "cosine"
    decay_iters: int = 1
    wsd_decay_style: str = "linear"
    wsd_decay_iters: Optional[int] = None

    @classmethod
    def from_config(cls, opt, train_iters: int, global_batch_size: Optional[int] = None) -> "LRSchedule":
        """Megatron's lengths, in iterations: decay over --lr-decay-iters, or --lr-decay-samples / global
        batch, or the run; warm-up over --lr-warmup-fraction x the decay length, or --lr-warmup-samples /
        global batch, or --lr-warmup-iters. Sample counts divide exactly (Megatron counts its sample-based
        schedule in samples, global_batch_size per step: the same lr at every step)."""
        per = float(global_batch_size) if global_batch_size else None
        samples = lambda n: (n / per) if (n and per) else None  # noqa: E731
        decay = opt.lr_decay_iters or samples(getattr(opt, "lr_decay_samples", None)) or train_iters
        fraction = getattr(opt, "lr_warmup_fraction", None)
        if fraction is not None:
            warmup = fraction * decay
        else:
            warmup = samples(getattr(opt, "lr_warmup_samples", 0)) or opt.lr_warmup_iters
        as_int = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731
        return cls(lr=opt.lr, min_lr=opt.min_lr, warmup_iters=as_int(warmup), warmup_init=opt.lr_warmup_init,
                   decay_style=opt.lr_decay_style, decay_iters=as_int(decay),
                   wsd_decay_style=opt.lr_wsd_decay_style, wsd_decay_iters=opt.lr_wsd_decay_iters)

    def __call__(self, iteration: int) -> float:
        i = float(iteration)
        if self.warmup_iters > 0 and i <= self.warmup_iters:
            return self.warmup_init + (self.lr - self.warmup_init) * i / self.warmup_iters
        if self.decay_style == "constant":
            return self.lr
        if self.decay_style == "inverse-square-root":
            return max(self.min_lr, self.lr * math.sqrt(max(self.warmup_iters, 1) / max(i, 1.0)))
        if i > self.decay_iters:
            return self.min_lr
        span = max(self.decay_iters - self.warmup_iters, 1)
        r = min(max((i - self.warmup_iters) / span, 0.0), 1.0)
        if self.decay_style == "linear":
            coeff = 1.0 - r
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * r) + 1.0)
        elif self.decay_style == "wsd":
            coeff = self._wsd_coeff(i)
        else:
            raise ValueError(f"lr_decay_style={self.decay_style!r}: choose constant, linear, cosine, wsd, "
                             f"inverse-square-root")
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def _wsd_coeff(self, i: float) -> float:
        decay = int(self.wsd_decay_iters if self.wsd_decay_iters is not None else
                    max(1, (self.decay_iters - self.warmup_iters) // 10))
        start = self.decay_iters - decay
        if i <= start:
            return 1.0
        r = min((i - start) / max(decay, 1), 1.0)
        style = self.wsd_decay_style
        if style == "linear":
            return 1.0 - r
        if style == "cosine":
            return 0.5 * (math.cos(math.pi * r) + 1.0)
        if style == "exponential":
            return 2.0 * 0.5 ** r - 1.0
        if style == "minus_sqrt":
            return 1.0 - math.sqrt(r)
        raise ValueError(f"lr_wsd_decay_style={style!r}: choose linear, cosine, exponential, minus_sqrt")

    def state_dict(self) -> dict:
        return dict(self.__dict__)
