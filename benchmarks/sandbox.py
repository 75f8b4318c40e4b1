#!/usr/bin/env python
"""Cost of the sandbox: the 164 canonical HumanEval programs, executed with N workers, in

  baseline  plain `subprocess.run([python, -I, -c, program])` with a timeout (no isolation at all)
  basic     our sandbox without namespaces (rlimits, session, caps, nonce check)
  jail      our sandbox with namespaces, tmpfs root, unprivileged uid (the default here)
  jail -S   the same with `no_site=True` (stdlib only: faster interpreter start)

and prints a table with programs/s, ms per program (wall / workers), and the ratio to the
baseline, all measured in the same run.

    python benchmarks/sandbox.py [--n 164] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_diffu.eval.humaneval import load_humaneval  # noqa: E402
from megatron_diffu.execution import sandbox  # noqa: E402
from megatron_diffu.execution.problems import build_program  # noqa: E402


def plain(program: str) -> bool:
    try:
        return subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def timed(fn, programs, workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ok = sum(pool.map(fn, programs))
    return time.perf_counter() - t0, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=164, help="number of HumanEval programs")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    problems = list(load_humaneval().values())[:args.n]
    programs = [build_program(p, p.canonical_solution) for p in problems]
    sandbox.set_max_concurrency(args.workers)
    modes = [("baseline (plain subprocess)", plain),
             ("basic", lambda c: sandbox.run_python(c, 10.0, mode="basic").passed)]
    if sandbox.sandbox_mode() == "jail":
        modes += [("jail", lambda c: sandbox.run_python(c, 10.0, mode="jail").passed),
                  ("jail -S (no_site)", lambda c: sandbox.run_python(c, 10.0, mode="jail", no_site=True).passed)]
    rows = []
    for name, fn in modes:
        secs, ok = timed(fn, programs, args.workers)
        rows.append((name, secs, ok))
        print(f"  {name}: {secs:.1f} s", file=sys.stderr)
    base = rows[0][1]
    print(f"\n{len(programs)} HumanEval canonical programs, {args.workers} workers, load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(f"{'mode':<28}{'passed':>8}{'total s':>10}{'prog/s':>9}{'ms/prog':>10}{'vs baseline':>13}")
    for name, secs, ok in rows:
        print(f"{name:<28}{ok:>8}{secs:>10.2f}{len(programs) / secs:>9.1f}"
              f"{1000 * secs * args.workers / len(programs):>10.0f}{secs / base:>12.2f}x")


if __name__ == "__main__":
    main()
