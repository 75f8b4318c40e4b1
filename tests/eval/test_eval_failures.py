"""One completion never costs the others (issue 13, item 4): one evaluation mixes every kind of
failure a completion can cause; each gets its own named failure, every other sample is scored,
and the results file is complete (every sample once, in order) and written atomically."""
import json
import os

import pytest

from megatron_diffu.eval.humaneval import load_humaneval, run_evaluation
from megatron_diffu.execution.problems import Problem
from megatron_diffu.execution.sandbox import signal_name

DAEMON = ("    import os, time\n"
          "    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
          "            time.sleep(120)\n        os._exit(0)\n"
          "    time.sleep(0.2)\n    return True\n")
# a check whose inputs depend on the candidate's results: neither decomposed nor replayed, in-process
LOOP = Problem("toy/loop", "def f(x):\n", entry_point="f",
               test="def check(candidate):\n    x = 1\n    for _ in range(3):\n        x = candidate(x)\n    assert x == 8\n",
               canonical_solution="    return 2 * x\n")
# (completion, expected `result` start, expected status) per sample of HumanEval/0 (judged outside)
# and of toy/loop (judged in-process)
BAD = {
    "realtime_signal": ("    import os\n    os.kill(os.getpid(), 40)\n",
                        "failed: crashed: signal 40 (SIGRTMIN+", "crashed"),
    "lone_surrogate": ("    return '\ud800'\n", "failed: invalid completion: not UTF-8 encodable", "failed"),
    "nul": ("    return 0\x00\n", "failed: invalid completion: contains a NUL character", "failed"),
    "huge_line": ("    import sys\n    sys.stdout.write('x' * 20_000_000)\n    return True\n",
                  "failed: output exceeded", "resource_limit"),
    "daemon": (DAEMON, "failed: AssertionError: wrong result", "failed"),
    "segfault": ("    import ctypes\n    ctypes.string_at(0)\n", "failed: crashed: signal 11 (SIGSEGV)", "crashed"),
}


def test_signal_names_cover_realtime_and_unknown_numbers():
    assert signal_name(11) == "SIGSEGV" and signal_name(40).startswith("SIGRTMIN+") and signal_name(200) == "unknown signal"


def test_every_failure_kind_in_one_evaluation(tmp_path):
    problems = load_humaneval()
    subset = {"HumanEval/0": problems["HumanEval/0"], "toy/loop": LOOP}
    kinds = sorted(BAD)
    n = len(kinds) + 1  # sample 0 of each task: the canonical solution; then one per failure kind

    def generate(prompts, sample_ids):
        return [subset[t].canonical_solution if i == 0 else BAD[kinds[i - 1]][0] for t, i in sample_ids]

    out = tmp_path / "res.jsonl"
    report = run_evaluation(generate, subset, n_samples=n, out_path=str(out), batch_size=5, timeout=10.0, ks=(1,))
    lines = out.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    # complete: every sample exactly once, in problem then sample order; no temporary file left behind
    assert [(r["task_id"], r["sample_index"]) for r in records] == [(t, i) for t in subset for i in range(n)]
    assert sorted(os.listdir(tmp_path)) == ["res.jsonl", "res.jsonl.summary.json"]
    for r in records:
        if r["sample_index"] == 0:
            assert r["passed"] and r["result"] == "passed", r
            continue
        kind = kinds[r["sample_index"] - 1]
        _, want, status = BAD[kind]
        if kind == "daemon" and r["task_id"] == "toy/loop":
            want = "failed: AssertionError"  # in-process: its own assertion fails
        assert not r["passed"], (kind, r)
        assert r["result"].startswith(want), (kind, r["result"])
        if kind != "daemon":
            assert r["status"] == status, (kind, r)
        else:
            assert r["duration_s"] < 10.0, r  # the daemon left behind does not hold the sample up
    assert [r["judged"] for r in records[:n]] == ["outside"] * n
    assert [r["judged"] for r in records[n:]] == ["in-process"] * n
    assert report["n_records"] == 2 * n and report["pass@1"] == pytest.approx(1 / n)
