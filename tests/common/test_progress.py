"""common/progress.py with a fake clock: rate and ETA by hand, at most one line every `every_s`
seconds, and one line at the end."""
from __future__ import annotations

from megatron_diffu.common.progress import Progress, format_eta


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(total, **kw):
    clock, lines = Clock(), []
    p = Progress(total, kw.pop("label", "job"), log=lines.append, clock=clock, **kw)
    return p, clock, lines


def test_format_eta():
    assert format_eta(0) == "0:00:00"
    assert format_eta(59.6) == "0:01:00"
    assert format_eta(3 * 3600 + 25 * 60 + 7) == "3:25:07"
    assert format_eta(-5) == "0:00:00"
    assert format_eta(float("inf")) == "?" and format_eta(float("nan")) == "?"


def test_rate_and_eta_by_hand():
    p, clock, lines = make(1000, unit="it", every_s=5.0)
    clock.t += 4.0
    p.update(100)  # 4 s < 5 s: no line
    assert lines == []
    assert p.rate() == 100 / 4.0  # 25 it/s
    assert p.eta_s() == (1000 - 100) / 25.0  # 36 s
    clock.t += 1.0
    p.update(150)  # 5 s after the start: a line; 250 done in 5 s = 50 it/s; 750 left = 15 s
    assert lines == ["job: 250/1,000 it (50.00 it/s, ETA 0:00:15)"]


def test_bytes_as_megabytes():
    mb = 2 ** 20
    p, clock, lines = make(300 * mb, unit="MB", scale=2 ** 20, every_s=2.0)
    clock.t += 2.0
    p.update(100 * mb)  # 100 MB in 2 s = 50 MB/s; 200 MB left = 4 s
    assert lines == ["job: 100/300 MB (50.00 MB/s, ETA 0:00:04)"]
    q, clock, lines = make(3 * mb, unit="MB", scale=2 ** 20, decimals=1, every_s=1.0)
    clock.t += 1.0
    q.update(mb // 2)
    assert lines == ["job: 0.5/3.0 MB (0.50 MB/s, ETA 0:00:05)"]


def test_at_most_every_every_s_and_once_at_the_end():
    p, clock, lines = make(10, every_s=10.0)
    for _ in range(9):  # one unit every 3 s, at 3, 6, ..., 27 s after the start
        clock.t += 3.0
        p.update(1)
    # lines at 12 s (the first update >= 10 s after the start) and 24 s (>= 10 s after 12 s)
    assert len(lines) == 2
    assert lines[0] == "job: 4/10 (0.33/s, ETA 0:00:18)"  # 4 in 12 s; 6 left at 1/3 per s
    assert lines[1] == "job: 8/10 (0.33/s, ETA 0:00:06)"
    clock.t += 0.5
    p.update(1)  # reaches the total: logged although only 2.5 s passed
    assert len(lines) == 3 and lines[2].startswith("job: 10/10 ") and "ETA 0:00:00" in lines[2]
    p.update(0)
    p.update(1)  # past the total within every_s: not logged again
    assert len(lines) == 3
    p.finish()  # the state changed since the last line: one final line
    assert len(lines) == 4 and lines[3].startswith("job: 11/10 ")
    p.finish()  # nothing new: no duplicate
    assert len(lines) == 4


def test_force_disabled_and_counters():
    p, clock, lines = make(100, enabled=False)
    p.update(100, force=True)
    p.finish()
    assert lines == []
    p, clock, lines = make(100, label="[preprocess]", every_s=60.0, counters=("docs", "tokens"))
    clock.t += 2.0
    p.update(10, docs=3, tokens=40)
    assert lines == []
    p.update(0, force=True)
    assert lines == ["[preprocess]: 10/100 (5.00/s, ETA 0:00:18) | 3 docs (2 docs/s) | 40 tokens (20 tokens/s)"]
    assert p.counts == {"docs": 3, "tokens": 40}
