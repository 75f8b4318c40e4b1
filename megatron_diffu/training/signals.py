"""Exit signals (SLURM pre-emption): SIGTERM / SIGUSR1 -> checkpoint at the end of the step, exit.

The handler only sets a flag; the trainer calls `ExitSignalHandler.should_exit()` once per step,
which all-reduces the flag (MAX) over the world so every rank agrees on the same iteration even
if the signal reached only some of them. The trainer then saves a checkpoint on all ranks (when
`--save` is set) and exits with

    EXIT_CODE_SIGNAL = 75   (os.EX_TEMPFAIL: "temporary failure, run me again")

after a complete save, so a SLURM script can requeue on 75 (`scontrol requeue $SLURM_JOB_ID`)
and treat 0 as "training finished" and anything else as a real failure. `--exit-interval N`
(a planned stop) saves and exits with 0. A second signal while the save is running is ignored
(the save is atomic either way; a SIGKILL leaves the previous `latest`).

SLURM usage: `#SBATCH --signal=B:USR1@300` (or TERM) delivers the signal 300 s before the time
limit; srun forwards SIGTERM to every task.
"""
from __future__ import annotations

import signal
from typing import Iterable, Optional

import torch
import torch.distributed as dist

EXIT_CODE_SIGNAL = 75
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    """Install with `with ExitSignalHandler() as h:`; previous handlers are restored on exit."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, group=None, device=None):
        self.signals = tuple(signals)
        self.group, self.device = group, device
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is None:
            print(f"[signals] received {signal.Signals(signum).name}: will checkpoint and exit at the end of "
                  f"this step", flush=True)
        self.received = signum

    def __enter__(self) -> "ExitSignalHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_exit(self) -> bool:
        """Collective over `group` (world by default): True on every rank if any rank got a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device=self.device or "cpu")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
