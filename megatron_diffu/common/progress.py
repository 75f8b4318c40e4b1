"""The one progress reporter: `label: done/total unit (rate unit/s, ETA h:mm:ss)` at most every
`every_s` seconds (and once at the end), to a log function or stream.

Named counters ride along on the same line with their own rates, e.g. a tokenizer's
`... | 1,200 docs (400 docs/s) | 90,000 tokens (30,000 tokens/s)`.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts work done; `scale`/`unit` format it (e.g. bytes shown as MB: scale=2**20, unit="MB").

    A line is logged when `update` finds `every_s` seconds passed since the last one, when the work
    first reaches `total`, or when forced; `finish()` logs the final state unless the last line
    already showed it. `counters`: names of extra counts (`update(n, docs=3)`), shown with their
    rates after the main figure. `decimals`: digits of done/total (after scaling).
    """

    def __init__(self, total: float, label: str, unit: str = "", every_s: float = 10.0,
                 log: Optional[Callable[[str], None]] = None, enabled: bool = True, scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, counters: Sequence[str] = (),
                 decimals: int = 0) -> None:
        self.total, self.label, self.unit, self.every_s = max(float(total), 0.0), label, unit, every_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.enabled, self.scale, self.clock, self.decimals = enabled, scale, clock, decimals
        self.start = self.last = clock()
        self.done = 0.0
        self.counts = {name: 0 for name in counters}
        self._ended = False  # the line of the first update that reached `total` was logged
        self._logged: Optional[tuple] = None  # the state the last line showed

    def elapsed(self, now: Optional[float] = None) -> float:
        return max((self.clock() if now is None else now) - self.start, 1e-9)

    def rate(self, now: Optional[float] = None) -> float:
        return self.done / self.elapsed(now)

    def eta_s(self, now: Optional[float] = None) -> float:
        r = self.rate(now)
        return (self.total - self.done) / r if r > 0 else float("inf")

    def line(self, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        u = f" {self.unit}" if self.unit else ""
        d = self.decimals
        fmt = (lambda v: f"{v / self.scale:,.{d}f}") if self.scale != 1.0 else (lambda v: f"{v:,.{d}f}")
        text = (f"{self.label}: {fmt(self.done)}/{fmt(self.total)}{u} "
                f"({self.rate(now) / self.scale:,.2f}{u}/s, ETA {format_eta(self.eta_s(now))})")
        dt = self.elapsed(now)
        for name, count in self.counts.items():
            text += f" | {count:,} {name} ({count / dt:,.0f} {name}/s)"
        return text

    def update(self, n: float = 1, force: bool = False, **counts: float) -> None:
        self.done += n
        for name, count in counts.items():
            self.counts[name] = self.counts.get(name, 0) + count
        now = self.clock()
        end = self.done >= self.total and not self._ended
        if self.enabled and (force or now - self.last >= self.every_s or end):
            self._emit(now)

    def finish(self) -> None:
        """Log the final state, unless the last line already showed exactly it."""
        if self.enabled and self._logged != self._state():
            self._emit(self.clock())

    def _state(self) -> tuple:
        return (self.done, tuple(self.counts.items()))

    def _emit(self, now: float) -> None:
        self.last = now
        self._ended = self._ended or self.done >= self.total
        self._logged = self._state()
        self.log(self.line(now))
