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
from megatron_diffu.execution.verdicts import judge, judged_sample_program  # noqa: E402


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
    judged = [judged_sample_program(p, p.canonical_solution) for p in problems]
    n_outside = sum(c is not None for _, c in judged)

    def outside(item) -> bool:  # the new design: outputs only in the jail, verdict decided here
        prog, cases = item
        res = sandbox.run_python(prog, 10.0, mode="jail", no_site=True)
        return res.passed and (cases is None or judge(cases, res.stdout)[0])
    sandbox.set_max_concurrency(args.workers)
    # basic mode never runs as uid 0: as root it needs an interpreter a fresh uid can run
    basic_py = None if os.geteuid() != 0 else next(
        (p for p in ("/usr/bin/python3", sys.executable) if os.path.exists(p) and sandbox._others_can_run(p)), "")
    modes = [("baseline (plain subprocess)", plain)]
    if basic_py != "":
        modes.append(("basic" + (f" ({basic_py})" if basic_py else ""),
                      lambda c: sandbox.run_python(c, 10.0, mode="basic", python=basic_py).passed))
    if sandbox.sandbox_mode() == "jail":
        modes += [("jail", lambda c: sandbox.run_python(c, 10.0, mode="jail").passed),
                  ("jail -S (no_site)", lambda c: sandbox.run_python(c, 10.0, mode="jail", no_site=True).passed),
                  ("jail -S, judged outside", outside)]
    rows = []
    for name, fn in modes:
        secs, ok = timed(fn, judged if fn is outside else programs, args.workers)
        rows.append((name, secs, ok))
        print(f"  {name}: {secs:.1f} s", file=sys.stderr)
    base = rows[0][1]
    print(f"\n{len(programs)} HumanEval canonical programs, {args.workers} workers, load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(f"{'mode':<28}{'passed':>8}{'total s':>10}{'prog/s':>9}{'ms/prog':>10}{'vs baseline':>13}")
    for name, secs, ok in rows:
        print(f"{name:<28}{ok:>8}{secs:>10.2f}{len(programs) / secs:>9.1f}"
              f"{1000 * secs * args.workers / len(programs):>10.0f}{secs / base:>12.2f}x")
    print(f"\nverdicts decided outside the untrusted process: {n_outside}/{len(programs)} problems "
          f"({100 * n_outside / len(programs):.0f}%); the rest run in-process (human-eval style)")


if __name__ == "__main__":
    main()
