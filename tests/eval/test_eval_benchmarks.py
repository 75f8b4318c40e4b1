"""HumanEval+, MBPP+ and MBPP from their published formats (`megatron_diffu.eval.benchmarks`), on
small hand-made files in each format (tests/assets/): the conversion (the canonical solution passes
in the sandbox, a wrong one fails), the prompts, and `tools/evaluate.py --benchmark ... --samples`."""
import json
import logging
import os
import subprocess
import sys

import pytest

from megatron_diffu.eval.benchmarks import (QWENCODER_INSTRUCTION, QWENCODER_SYSTEM, load_benchmark, load_mbpp,
                                            qwencoder_messages)
from megatron_diffu.eval.humaneval import ProblemFormatError, evaluate_samples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(REPO, "tests", "assets")
FILES = {"humaneval_plus": "HumanEvalPlus-mini.jsonl", "mbpp_plus": "MbppPlus-mini.jsonl",
         "mbpp": "mbpp-mini.jsonl", "mbpp_sanitized": "sanitized-mbpp-mini.json"}

WRONG = {  # (benchmark file, task_id) -> a wrong completion
    ("humaneval_plus", "HumanEval/0"): "    return False\n",
    ("humaneval_plus", "HumanEval/2"): "    return number - int(number) + 1e-5\n",  # outside the 1e-6 atol
    ("humaneval_plus", "HumanEval/53"): "    return x - y\n",
    ("mbpp_plus", "Mbpp/2"): "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n",
    ("mbpp_plus", "Mbpp/17"): "def square_perimeter(a):\n    return a * a\n",
    ("mbpp_plus", "Mbpp/82"): "def volume_sphere(r):\n    return 4 / 3 * 3.14 * r ** 3\n",
    ("mbpp_plus", "Mbpp/3"): "def is_not_prime(n):\n    return False\n",
    ("mbpp", "Mbpp/2"): "def similar_elements(a, b):\n    return (4, 5)\n",
    ("mbpp", "Mbpp/3"): "def is_not_prime(n):\n    return n % 2 == 0\n",
    ("mbpp", "Mbpp/4"): "def heap_queue_largest(nums, n):\n    return sorted(nums)[:n]\n",
    ("mbpp_sanitized", "Mbpp/2"): "def similar_elements(a, b):\n    return ()\n",
    ("mbpp_sanitized", "Mbpp/82"): "def volume_sphere(r):\n    return r ** 3\n",
}


def _load(kind):
    return load_benchmark("mbpp" if kind == "mbpp_sanitized" else kind, os.path.join(ASSETS, FILES[kind]))


@pytest.mark.parametrize("kind", sorted(FILES))
def test_canonical_passes_and_wrong_fails_in_the_sandbox(kind):
    problems = _load(kind)
    wrong = {tid: c for (k, tid), c in WRONG.items() if k == kind}
    assert set(wrong) == set(problems)
    samples = [{"task_id": t, "completion": p.canonical_solution} for t, p in problems.items()]
    samples += [{"task_id": t, "completion": c} for t, c in wrong.items()]
    results = evaluate_samples(samples, problems, timeout=5, progress=False)
    n = len(problems)
    assert [r["passed"] for r in results[:n]] == [True] * n, [r["result"] for r in results[:n]]
    assert [r["passed"] for r in results[n:]] == [False] * n, [r["result"] for r in results[n:]]


def test_humaneval_plus_conversion_and_prompt():
    problems = _load("humaneval_plus")
    p0 = problems["HumanEval/0"]
    raw = json.loads(open(os.path.join(ASSETS, FILES["humaneval_plus"])).readline())
    assert p0.prompt == raw["prompt"].strip() + "\n"  # qwencoder-eval's base prompt
    assert p0.include_prompt and p0.entry_point == "has_close_elements" and not p0.test
    assert len(p0.tests) == len(raw["base_input"]) + len(raw["plus_input"])  # base + plus inputs
    assert p0.tests[0] == "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    # float results: EvalPlus's default atol 1e-6 (plus rtol 1e-7), decided outside the process
    assert problems["HumanEval/2"].tests[0] == "assert abs(truncate_number(3.5) - 0.5) <= 1.05e-06"
    near = [{"task_id": "HumanEval/2", "completion": "    return number - int(number)\n"}]
    res = evaluate_samples(near, problems, timeout=5, progress=False)
    assert res[0]["passed"] and res[0]["judged"] == "outside"
    # a release without literal results keeps its published check program (base tests)
    assert problems["HumanEval/53"].tests == [] and "def check(candidate)" in problems["HumanEval/53"].test


def test_mbpp_plus_conversion_prompt_and_special_oracle():
    problems = _load("mbpp_plus")
    p2 = problems["Mbpp/2"]
    assert p2.prompt == ('"""\nWrite a function to find the shared elements from the given two lists.\n'
                         'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n')
    assert p2.tests[0] == "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))"
    # EvalPlus compares similar_elements' output as a set: any order passes
    other_order = [{"task_id": "Mbpp/2",
                    "completion": "def similar_elements(a, b):\n    return sorted(set(a) & set(b), reverse=True)\n"}]
    assert evaluate_samples(other_order, problems, timeout=5, progress=False)[0]["passed"]
    assert problems["Mbpp/82"].tests[0].startswith("assert abs(volume_sphere(10) - 4188.79")  # atol 1e-4
    # v0.1.0-style record (only `assertion`): its asserts, one test each
    assert problems["Mbpp/3"].tests == ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                                        "assert is_not_prime(35) == True", "assert is_not_prime(37) == False"]


def test_mbpp_release_formats_and_prompt():
    problems = _load("mbpp")
    assert list(problems) == ["Mbpp/2", "Mbpp/3", "Mbpp/4"]
    assert problems["Mbpp/2"].prompt == (
        '"""\nWrite a function to find the similar elements from the given two tuple lists.\n'
        'assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"""\n')  # text + first test
    assert len(problems["Mbpp/3"].tests) == 3 and problems["Mbpp/4"].test.startswith("NUMS = ")  # setup code
    with_challenge = load_mbpp(os.path.join(ASSETS, FILES["mbpp"]), challenge_tests=True)
    assert with_challenge["Mbpp/3"].tests[-1] == "assert is_not_prime(37) == False"
    sanitized = _load("mbpp_sanitized")
    assert sanitized["Mbpp/82"].test == "import math"  # test_imports
    assert sanitized["Mbpp/2"].prompt.startswith('"""\nWrite a function to find the shared elements')


def test_qwencoder_chat_wording():
    msgs = qwencoder_messages("def f(x):\n    pass\n")
    assert msgs[0] == {"role": "system", "content": QWENCODER_SYSTEM}
    assert msgs[1]["content"] == f"{QWENCODER_INSTRUCTION}\n```python\ndef f(x):\n    pass\n```"


def test_format_errors_are_named(tmp_path):
    with pytest.raises(ProblemFormatError, match="right --benchmark"):  # an MBPP file as HumanEval+
        load_benchmark("humaneval_plus", os.path.join(ASSETS, FILES["mbpp"]))
    with pytest.raises(ValueError, match="needs --problems"):
        load_benchmark("mbpp_plus")
    with pytest.raises(FileNotFoundError):
        load_benchmark("mbpp", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 1, "text": "x", "test_list": []}) + "\n")
    with pytest.raises(ProblemFormatError, match="test_list"):
        load_benchmark("mbpp", str(bad))


def test_base_only_records_are_reported(caplog):
    with caplog.at_level(logging.WARNING):
        _load("humaneval_plus")
    assert "1 of 3 problems have no literal plus inputs/results" in caplog.text


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)


@pytest.mark.parametrize("kind", ["humaneval_plus", "mbpp_plus", "mbpp"])
def test_cli_samples_mode(kind, tmp_path):
    problems = _load(kind)
    samples = [{"task_id": t, "completion": p.canonical_solution} for t, p in problems.items()]
    wrong_tid = next(iter(problems))
    samples.append({"task_id": wrong_tid, "completion": WRONG[(kind, wrong_tid)]})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    proc = _tool("--benchmark", kind, "--problems", os.path.join(ASSETS, FILES[kind]), "--samples", str(path),
                 "--k", "1,2", "--timeout", "5")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    n = len(problems)
    assert report["pass@1"] == pytest.approx((n - 1 + 0.5) / n) and report["n_samples"] == n + 1
    results = [json.loads(line) for line in open(str(path) + "_results.jsonl")]
    assert [r["passed"] for r in results] == [True] * n + [False]
    assert results[-1]["result"].startswith("failed:")


def test_cli_refuses_a_benchmark_without_its_file_and_heldout_on_mbpp(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"task_id": "Mbpp/2", "completion": ""}) + "\n")
    proc = _tool("--benchmark", "mbpp", "--samples", str(path))
    assert proc.returncode != 0 and "needs --problems" in proc.stderr
    proc = _tool("--benchmark", "mbpp", "--problems", os.path.join(ASSETS, FILES["mbpp"]), "--samples", str(path),
                 "--heldout")
    assert proc.returncode != 0 and "--heldout" in proc.stderr


def test_dict_results_and_math_in_published_asserts(tmp_path):
    """A dict result is compared in-process (a Counter equals its dict, as in EvalPlus); published
    base asserts that call math.isclose get `import math` (MBPP+ v0.1.0 leaves it out)."""
    recs = [{"task_id": "Mbpp/88", "prompt": '"""\nCount.\n"""\n', "entry_point": "freq_count",
             "canonical_solution": "import collections\ndef freq_count(xs):\n  return collections.Counter(xs)\n",
             "test": "inputs = [[[1, 1, 2]]]\nresults = [{1: 2, 2: 1}]\n"},
            {"task_id": "Mbpp/120", "prompt": '"""\nHalf.\n"""\n', "entry_point": "half",
             "code": "def half(x):\n  return x / 2\n", "assertion": "assert math.isclose(half(3), 1.5)\n"}]
    path = tmp_path / "MbppPlus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    problems = load_benchmark("mbpp_plus", str(path))
    assert problems["Mbpp/88"].tests == ["assert (lambda _o: _o == {1: 2, 2: 1})(freq_count([1, 1, 2]))"]
    assert problems["Mbpp/120"].test == "import math"
    samples = [{"task_id": t, "completion": p.canonical_solution} for t, p in problems.items()]
    assert [r["passed"] for r in evaluate_samples(samples, problems, timeout=5, progress=False)] == [True, True]
