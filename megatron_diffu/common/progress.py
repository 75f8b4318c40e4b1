"""The one progress reporter: `label: done/total unit (rate unit/s, ETA h:mm:ss)` at most every
`every_s` seconds (and once at the end), to a log function or stream."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts work done; `scale`/`unit` format it (e.g. bytes shown as MB: scale=2**20, unit="MB")."""

    def __init__(self, total: float, label: str, unit: str = "", every_s: float = 10.0,
                 log: Optional[Callable[[str], None]] = None, enabled: bool = True, scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.unit, self.every_s = max(float(total), 0.0), label, unit, every_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.enabled, self.scale, self.clock = enabled, scale, clock
        self.start = self.last = clock()
        self.done = 0.0

    def rate(self) -> float:
        return self.done / max(self.clock() - self.start, 1e-9)

    def eta_s(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else float("inf")

    def line(self) -> str:
        u = f" {self.unit}" if self.unit else ""
        fmt = (lambda v: f"{v / self.scale:,.0f}") if self.scale != 1.0 else (lambda v: f"{v:,.0f}")
        return (f"{self.label}: {fmt(self.done)}/{fmt(self.total)}{u} "
                f"({self.rate() / self.scale:,.2f}{u}/s, ETA {format_eta(self.eta_s())})")

    def update(self, n: float = 1, force: bool = False) -> None:
        self.done += n
        now = self.clock()
        if self.enabled and (force or now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            self.log(self.line())
