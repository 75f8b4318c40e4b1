"""Checks that do not decompose statically, replayed on the trusted side (see below)."""
from __future__ import annotations

import ast as _ast
import builtins as _builtins
import math as _math
from dataclasses import dataclass
from typing import Optional

from .cases import Case, decode_value
from .problems import Problem

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
