"""Helpers for tests: run a function on N gloo ranks and collect the results (`run_distributed`),
and a run-config stand-in for saving bare model checkpoints (`ModelOnlyRunConfig`).

Every multi-process test in the suite goes through `run_distributed`, so they all get the
same guarantees: one fresh process per rank (spawned, not forked, so no torch state leaks in),
a free TCP port, one intra-op thread per rank (2 ranks on a 2-core CI machine), a hard
timeout that kills every rank, and the failing rank's traceback re-raised in the test.
"""
from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

from megatron_diffu.parallel.launch import free_port, shutdown_distributed


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any], queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, *args)
        # Plain pickle (not the queue's ForkingPickler): tensors travel by value, so they stay
        # valid after this rank exits (shared-memory handles would not).
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        queue.put((rank, False, traceback.format_exc()))
    finally:
        shutdown_distributed()


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence[Any] = (), timeout: float = 300.0) -> list:
    """Run `fn(rank, *args)` on `world_size` gloo ranks; return the results ordered by rank.

    `fn` must be importable (a module-level function) because ranks are spawned.
    Results must be picklable (move tensors to CPU; they are).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed test timed out after {timeout:.0f}s ({len(results)} ranks finished)")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 5.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    raise RuntimeError(f"rank process died with exit code {dead[0].exitcode} without reporting")
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # one failure is enough; the others may be blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


class ModelOnlyRunConfig:
    """Stand-in for a composed run config where a test saves a checkpoint of a bare model: only the
    `model:` section is written to the checkpoint's config YAML (all a loader reads back)."""

    def __init__(self, model_cfg) -> None:
        self.model_cfg = model_cfg

    def save_yaml(self, path: str) -> None:
        import dataclasses

        import yaml

        section = {k: v for k, v in dataclasses.asdict(self.model_cfg).items()
                   if isinstance(v, (int, float, str, bool, type(None)))}
        with open(path, "w") as f:
            yaml.safe_dump({"model": section}, f)
