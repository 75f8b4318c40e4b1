"""`init_distributed`: one call that initialises torch.distributed under torchrun, srun, or alone.

Resolution order (first match wins), done by the pure function `resolve_launch_env(env)`:

1. **torchrun** (or any launcher exporting the env:// variables): ``RANK`` and ``WORLD_SIZE``
   are set; ``LOCAL_RANK`` (default 0), ``MASTER_ADDR`` / ``MASTER_PORT`` as given.
2. **srun** (one task per GPU, no torchrun): ``SLURM_PROCID`` plus ``SLURM_STEP_NUM_TASKS``
   (or ``SLURM_NTASKS``) and ``SLURM_LOCALID``; the master address is the first host of
   ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (expanded by `expand_nodelist`, an own
   parser of Slurm's ``node[01-04,07]`` syntax, falling back to ``scontrol show hostnames``),
   unless ``MASTER_ADDR`` is set; the port is ``MASTER_PORT`` or `default_port(SLURM_JOB_ID)`
   (20000 + job id mod 20000: distinct jobs sharing a node rarely collide, and every task of
   one job agrees without talking). Only an srun *step* counts: the sbatch batch script itself
   also carries ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, and a python started there
   directly would wait forever for ranks that never come, so without ``SLURM_STEP_ID`` (or with
   the batch step's id) it is treated as a single process, with a warning if the job has more
   tasks.
3. **single process**: none of the above. Decision: by default torch.distributed is NOT
   initialised (use `ProcessGrid.single()`); `init_single_process_group=True` creates a
   1-rank gloo group instead (on a private TCP port) for code that wants collectives to exist.

Backend: ``backend`` argument, else the environment variable ``MDIFFU_DIST_BACKEND`` (the CPU
switch of the SLURM examples: ``gloo``), else NCCL when CUDA is available and gloo otherwise.
With NCCL the CUDA device is set to ``local_rank % device_count`` before the group is created.
"""
from __future__ import annotations

import datetime
import gc
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

BACKEND_ENV = "MDIFFU_DIST_BACKEND"

__all__ = ["init_distributed", "shutdown_distributed", "resolve_launch_env", "expand_nodelist", "default_port", "free_port", "LaunchEnv",
           "choose_backend"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it): the rendezvous port of a
    single-process group, and of `megatron_diffu.testing.run_distributed`'s ranks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


# ------------------------------------------------------------------------------- nodelist
_TOKEN = re.compile(r"\[([^\]]*)\]")


def _split_top_level(s: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm nodelist {s!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm nodelist {s!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as Slurm does)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in Slurm nodelist {whole!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in Slurm nodelist {whole!r}")
        width = len(lo)
        out.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: 'node[01-04,07],gpu-[1-2]-ib' -> ['node01', ..., 'gpu-2-ib'].

    Several bracket groups in one name ('r[1-2]n[1-2]') expand as a product, like Slurm.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        pieces = _TOKEN.split(part)  # literal, range, literal, range, ..., literal
        choices = [[p] if i % 2 == 0 else _expand_range(p, nodelist) for i, p in enumerate(pieces)]
        if any("[" in c or "]" in c for c in pieces[::2]):
            raise ValueError(f"malformed Slurm nodelist {nodelist!r}")
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"empty Slurm nodelist {nodelist!r}")
    return hosts


def _first_host(nodelist: str) -> str:
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        if shutil.which("scontrol"):  # a syntax we do not know: ask Slurm itself
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        raise


def default_port(job_id: Optional[str]) -> int:
    """Rendezvous port derived from the job id (all tasks of a job agree without talking)."""
    try:
        return 20000 + int(str(job_id).split("_")[0]) % 20000
    except (TypeError, ValueError):
        return 29500


# ------------------------------------------------------------------------------- env
def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def resolve_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Work out rank/world/local rank/master from a launcher's environment (see module doc)."""
    env = os.environ if env is None else env
    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        return LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                         env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 29500))
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    in_srun_step = step not in (None, "") and step != "4294967294"  # the batch step's id (SLURM_BATCH_SCRIPT)
    if env.get("SLURM_PROCID") not in (None, "") and in_srun_step:
        world = _int(env, "SLURM_STEP_NUM_TASKS", None) if env.get("SLURM_STEP_NUM_TASKS") else _int(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = _first_host(nodelist)
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise ValueError("srun launch with SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST/MASTER_ADDR: "
                             "cannot find the rendezvous host; export MASTER_ADDR")
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else default_port(env.get("SLURM_JOB_ID"))
        return LaunchEnv("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), addr, port)
    if env.get("SLURM_JOB_ID") and _int(env, "SLURM_NTASKS", 1) > 1:
        print(f"[launch] warning: running in SLURM job {env['SLURM_JOB_ID']} with SLURM_NTASKS="
              f"{env['SLURM_NTASKS']} but outside an srun step: starting ONE process. Launch with "
              f"`srun python -m ...` (one task per GPU) to use all tasks.", file=sys.stderr)
    return LaunchEnv("single", 0, 1, 0)


def choose_backend(backend: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    backend = (backend or env.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")).lower()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"distributed backend {backend!r} (argument or ${BACKEND_ENV}): choose nccl or gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(f"backend nccl needs CUDA GPUs, none visible on {socket.gethostname()}: "
                         f"set {BACKEND_ENV}=gloo for a CPU run")
    return backend


# ------------------------------------------------------------------------------- init
def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0,
                     init_single_process_group: bool = False) -> tuple[int, int, int]:
    """Initialise torch.distributed for this launcher; returns (rank, world_size, local_rank).

    Idempotent: if a process group already exists its rank/world are returned. A single
    process (no launcher variables) returns (0, 1, 0) without a process group unless
    `init_single_process_group`.
    """
    launch = resolve_launch_env()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), launch.local_rank
    name = choose_backend(backend)
    if name == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if launch.launcher == "single" and not init_single_process_group:
        return 0, 1, 0
    port = launch.master_port
    if launch.launcher == "single":
        port = free_port()
    # export what env:// and downstream libraries expect, whatever the launcher
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(port))
    kwargs = dict(backend=name, rank=launch.rank, world_size=launch.world_size, init_method="env://",
                  timeout=datetime.timedelta(seconds=timeout_s))
    if name == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    try:
        dist.init_process_group(**kwargs)
    except Exception as exc:  # name the rendezvous so a wrong host/port is obvious
        raise RuntimeError(f"[launch] init_process_group({name}) failed for rank {launch.rank}/{launch.world_size} "
                           f"via {launch.launcher} at {launch.master_addr}:{port}: {exc}") from exc
    return launch.rank, launch.world_size, launch.local_rank


def shutdown_distributed() -> None:
    """Destroy every process group and free it now, while the interpreter is fully alive.

    Why the collection: `destroy_process_group` only drops torch's own references. The groups a
    run made (a `ProcessGrid` held by the trainer, reached through reference cycles) stay alive,
    each with its gloo threads (a TCP loop and two run loops per group), until the cycle collector
    or interpreter finalization frees them. Freed during finalization, a gloo worker that touches
    a Python-owned tensor cannot take the GIL any more and the process aborts with
    "terminate called without an active exception" (exit 134) after a run that succeeded; it
    happened to both ranks of the SLURM CI job. Collecting here joins those threads first.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
