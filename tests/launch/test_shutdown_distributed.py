"""`shutdown_distributed` frees every gloo group before the interpreter finalizes.

The failure it prevents: a 2-rank SLURM job trained, saved and then both ranks aborted with
"terminate called without an active exception" (exit 134). `destroy_process_group` alone leaves
the groups a `ProcessGrid` holds alive when the grid sits in a reference cycle (as the trainer's
does), each group with its gloo threads, until finalization frees them. The check is the OS's own
thread list of the rank (Linux `/proc/self/task/*/comm`, where gloo names its threads).
"""
from __future__ import annotations

import os
import sys

import pytest

from megatron_diffu.testing import run_distributed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


def _gloo_threads() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we listed
            pass
    return [n for n in names if "gloo" in n]


def _grid_in_a_cycle(rank: int, use_shutdown: bool) -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    from megatron_diffu.parallel.launch import shutdown_distributed
    from megatron_diffu.parallel.state import ProcessGrid

    holder: dict = {"grid": ProcessGrid.build()}
    holder["self"] = holder  # the trainer reaches its grid through cycles like this one
    t = torch.ones(1)
    dist.all_reduce(t, group=holder["grid"].dp_group)
    before = len(_gloo_threads())
    del holder
    if use_shutdown:
        shutdown_distributed()
    else:
        dist.destroy_process_group()
    return before, len(_gloo_threads())


def test_shutdown_joins_every_gloo_thread():
    for before, after in run_distributed(_grid_in_a_cycle, 2, args=(True,)):
        assert before > 0
        assert after == 0, f"{after} gloo threads still alive after shutdown_distributed"


def test_destroy_alone_leaves_the_grid_groups_alive():
    """The control: the case above is real (if torch ever frees these itself, this fails and the
    collection in shutdown_distributed can go)."""
    for before, after in run_distributed(_grid_in_a_cycle, 2, args=(False,)):
        assert after > 0 and after <= before
