"""A seeded family of small Python functions with assert tests (the mini reproduction's tasks).

A problem is a function given by its signature and docstring; its reference solution is one line
(or a short loop) and it has `NUM_TESTS` assert tests. A *template* is a context (how the function
walks its input: one value, a map over a list, a sum, a loop, a filter, a count, ...) combined with
one operator (`x plus k`, `x squared`, ...) and/or one predicate (`x is even`, `x is greater than
k`, ...), or a string operator/predicate. Every operator word therefore appears in many code
contexts, so that a model can learn the words apart from the templates.

Splits (each problem records its `split`):
- `train`: the TRAIN templates with the other constant values;
- `heldout_constants`: the same templates with a held-out value of their primary constant (a seeded
  quarter of its domain, `heldout_values`): the (template, that constant) pair never occurs in training;
- `rl_constants`: the same templates with a primary constant of another seeded quarter (`rl_values`,
  disjoint from the held-out one): problems for RL that SFT never saw and the evaluation never asks,
  as DiffuCoder's RL set (Acecoder) is neither its SFT data nor EvalPlus;
- `heldout_templates`: templates that never occur in training (`HELDOUT_TEMPLATES`: unseen
  context x operator compositions, plus the whole `filter_sum` context), any constants.
Templates without constants (e.g. `op_map:square`) are train-only (they cannot have new constants).

Deterministic: everything is drawn from `random.Random` seeded by strings of (seed, split, index).
Expected values are computed by the Python twin of each operator, never by executing code.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from megatron_diffu.execution.protocol import WHOLE_FUNCTION_INSTRUCTION, instruct_prompt

NUM_TESTS = 4
HELDOUT_BUCKETS = 4  # a quarter of each template's primary-constant values is held out
SPLITS = ("train", "heldout_constants", "heldout_templates", "rl_constants")
LETTERS = "abcdefgh"


@dataclass(frozen=True)
class Op:
    """A unary operator or predicate: docstring phrase, code, Python twin; `k` = its constant range."""
    phrase: str
    code: str
    fn: Callable
    k: Optional[tuple] = None   # (lo, hi) inclusive, or None
    c: bool = False             # takes a letter constant c
    d: bool = False             # takes a second letter constant d


INT_OPS = {
    "add": Op("{v} plus {k}", "{v} + {k}", lambda x, p: x + p["k"], (1, 19)),
    "sub": Op("{v} minus {k}", "{v} - {k}", lambda x, p: x - p["k"], (1, 19)),
    "mul": Op("{v} times {k}", "{v} * {k}", lambda x, p: x * p["k"], (2, 11)),
    "mod": Op("{v} modulo {k}", "{v} % {k}", lambda x, p: x % p["k"], (2, 9)),
    "fdiv": Op("{v} divided by {k}, rounded down", "{v} // {k}", lambda x, p: x // p["k"], (2, 9)),
    "square": Op("{v} squared", "{v} * {v}", lambda x, p: x * x),
    "neg": Op("minus {v}", "-{v}", lambda x, p: -x),
}
INT_PREDS = {
    "even": Op("{v} is even", "{v} % 2 == 0", lambda x, p: x % 2 == 0),
    "odd": Op("{v} is odd", "{v} % 2 == 1", lambda x, p: x % 2 == 1),
    "gt": Op("{v} is greater than {k}", "{v} > {k}", lambda x, p: x > p["k"], (0, 15)),
    "lt": Op("{v} is less than {k}", "{v} < {k}", lambda x, p: x < p["k"], (0, 15)),
    "div": Op("{v} is divisible by {k}", "{v} % {k} == 0", lambda x, p: x % p["k"] == 0, (3, 9)),
    "eq": Op("{v} equals {k}", "{v} == {k}", lambda x, p: x == p["k"], (0, 15)),
}
STR_OPS = {
    "upper": Op("{v} in upper case", "{v}.upper()", lambda s, p: s.upper()),
    "reverse": Op("{v} reversed", "{v}[::-1]", lambda s, p: s[::-1]),
    "repeat": Op("{v} repeated {k} times", "{v} * {k}", lambda s, p: s * p["k"], (2, 4)),
    "suffix": Op("{v} followed by '{c}'", "{v} + '{c}'", lambda s, p: s + p["c"], c=True),
    "prefix": Op("'{c}' followed by {v}", "'{c}' + {v}", lambda s, p: p["c"] + s, c=True),
    "replace": Op("{v} with every '{c}' replaced by '{d}'", "{v}.replace('{c}', '{d}')",
                  lambda s, p: s.replace(p["c"], p["d"]), c=True, d=True),
    "head": Op("the first {k} characters of {v}", "{v}[:{k}]", lambda s, p: s[:p["k"]], (1, 4)),
}
STR_PREDS = {
    "starts": Op("{v} starts with '{c}'", "{v}.startswith('{c}')", lambda s, p: s.startswith(p["c"]), c=True),
    "ends": Op("{v} ends with '{c}'", "{v}.endswith('{c}')", lambda s, p: s.endswith(p["c"]), c=True),
    "has": Op("{v} contains '{c}'", "'{c}' in {v}", lambda s, p: p["c"] in s, c=True),
    "longer": Op("{v} has more than {k} characters", "len({v}) > {k}", lambda s, p: len(s) > p["k"], (1, 5)),
}


@dataclass(frozen=True)
class Context:
    """How a function applies its operator(s): argument kind, docstring, body, Python twin."""
    arg: str          # int | list | n | str | words
    doc: str          # uses {op} {pred} {xs} {v} {a} {b} {x}
    body: str         # uses {op} {pred} {xs} {v} {a} {b} {x} (already indented, lines joined by \n)
    fn: Callable      # (input, op_fn, pred_fn, params) -> expected
    ops: Optional[dict] = None
    preds: Optional[dict] = None


def _first_index(xs, pred):
    for i, x in enumerate(xs):
        if pred(x):
            return i
    return -1


CONTEXTS = {
    "op_scalar": Context("int", "Return {op_x}.", "    return {op_x}", lambda x, o, q, p: o(x), ops=INT_OPS),
    "op_map": Context("list", "Return a list of {op_v} for each element {v} of {xs}.",
                      "    return [{op_v} for {v} in {xs}]", lambda xs, o, q, p: [o(v) for v in xs], ops=INT_OPS),
    "op_sum": Context("list", "Return the sum of {op_v} over the elements {v} of {xs}.",
                      "    return sum({op_v} for {v} in {xs})", lambda xs, o, q, p: sum(o(v) for v in xs), ops=INT_OPS),
    "op_loop": Context("n", "Return the sum of {op_i} for i from 0 to {x} - 1.",
                       "    total = 0\n    for i in range({x}):\n        total += {op_i}\n    return total",
                       lambda n, o, q, p: sum(o(i) for i in range(n)), ops=INT_OPS),
    "pred_scalar": Context("int", "Return True if {pred_x}, otherwise False.", "    return {pred_x}",
                           lambda x, o, q, p: q(x), preds=INT_PREDS),
    "pred_filter": Context("list", "Return the elements {v} of {xs} such that {pred_v}.",
                           "    return [{v} for {v} in {xs} if {pred_v}]",
                           lambda xs, o, q, p: [v for v in xs if q(v)], preds=INT_PREDS),
    "pred_count": Context("list", "Return how many elements {v} of {xs} are such that {pred_v}.",
                          "    return sum(1 for {v} in {xs} if {pred_v})",
                          lambda xs, o, q, p: sum(1 for v in xs if q(v)), preds=INT_PREDS),
    "pred_any": Context("list", "Return True if some element {v} of {xs} is such that {pred_v}, otherwise False.",
                        "    return any({pred_v} for {v} in {xs})", lambda xs, o, q, p: any(q(v) for v in xs),
                        preds=INT_PREDS),
    "pred_cond": Context("int", "Return {a} if {pred_x}, otherwise return {b}.",
                         "    if {pred_x}:\n        return {a}\n    return {b}",
                         lambda x, o, q, p: p["a"] if q(x) else p["b"], preds=INT_PREDS),
    "pred_index": Context("list", "Return the index of the first element {v} of {xs} such that {pred_v}, "
                                  "or -1 if there is none.",
                          "    for i, {v} in enumerate({xs}):\n        if {pred_v}:\n            return i\n    return -1",
                          lambda xs, o, q, p: _first_index(xs, q), preds=INT_PREDS),
    "filter_map": Context("list", "Return a list of {op_v} for each element {v} of {xs} such that {pred_v}.",
                          "    return [{op_v} for {v} in {xs} if {pred_v}]",
                          lambda xs, o, q, p: [o(v) for v in xs if q(v)], ops=INT_OPS, preds=INT_PREDS),
    "filter_sum": Context("list", "Return the sum of {op_v} over the elements {v} of {xs} such that {pred_v}.",
                          "    return sum({op_v} for {v} in {xs} if {pred_v})",
                          lambda xs, o, q, p: sum(o(v) for v in xs if q(v)), ops=INT_OPS, preds=INT_PREDS),
    "sop_scalar": Context("str", "Return {op_x}.", "    return {op_x}", lambda s, o, q, p: o(s), ops=STR_OPS),
    "sop_map": Context("words", "Return a list of {op_v} for each string {v} of {xs}.",
                       "    return [{op_v} for {v} in {xs}]", lambda ws, o, q, p: [o(w) for w in ws], ops=STR_OPS),
    "spred_filter": Context("words", "Return the strings {v} of {xs} such that {pred_v}.",
                            "    return [{v} for {v} in {xs} if {pred_v}]",
                            lambda ws, o, q, p: [w for w in ws if q(w)], preds=STR_PREDS),
    "spred_count": Context("words", "Return how many strings {v} of {xs} are such that {pred_v}.",
                           "    return sum(1 for {v} in {xs} if {pred_v})",
                           lambda ws, o, q, p: sum(1 for w in ws if q(w)), preds=STR_PREDS),
}

# Templates never seen in training: unseen (context, operator) compositions of seen parts, plus
# the whole filter_sum context (op_sum's phrase composed with pred_filter's).
HELDOUT_TEMPLATES = frozenset([
    "op_map:mul", "op_sum:square", "op_loop:sub", "op_scalar:fdiv",
    "pred_filter:div", "pred_count:gt", "pred_any:odd", "pred_cond:lt", "pred_index:even",
    "filter_map:add|odd", "filter_map:mul|gt", "filter_map:square|lt", "filter_map:sub|even",
    "sop_map:reverse", "sop_scalar:replace", "spred_filter:ends", "spred_count:longer",
] + [f"filter_sum:{o}|{q}" for o in ("add", "mul", "square") for q in ("even", "gt", "div")])

FUNC_NAMES = ("solve", "compute", "transform", "process", "helper", "apply_rule")  # few: copying a name is
# learnt late by a small model (a 2.6M model after 800 steps still wrote the most frequent one)
LIST_NAMES = ("xs", "nums", "values", "items")
WORD_NAMES = ("words", "strings", "names")
ELEM_NAMES = ("x", "v", "e")
SCALAR_NAMES = ("x", "n", "a")
STR_NAMES = ("s", "text", "word")
N_NAMES = ("n", "m", "count")


def all_templates(contexts: Optional[Sequence[str]] = None) -> list[str]:
    """Every template id `context:op`, `context:pred` or `context:op|pred`, in a fixed order
    (filter_sum only with the compositions listed in HELDOUT_TEMPLATES: it is a held-out context).
    `contexts` restricts the family to those contexts (None = all): a smaller family that a small
    model can learn in a short budget, still with held-out compositions of its seen parts."""
    if contexts is not None:
        unknown = sorted(set(contexts) - set(CONTEXTS))
        if unknown:
            raise ValueError(f"unknown task contexts {unknown}: choose from {sorted(CONTEXTS)}")
    out = []
    for cname, ctx in CONTEXTS.items():
        if contexts is not None and cname not in contexts:
            continue
        if ctx.ops and ctx.preds:
            out += [t for t in (f"{cname}:{o}|{q}" for o in ctx.ops for q in ctx.preds)
                    if cname != "filter_sum" or t in HELDOUT_TEMPLATES]
        elif ctx.ops:
            out += [f"{cname}:{o}" for o in ctx.ops]
        else:
            out += [f"{cname}:{q}" for q in ctx.preds]
    return out


def _parts(template: str):
    cname, rest = template.split(":")
    ctx = CONTEXTS[cname]
    if ctx.ops and ctx.preds:
        o, q = rest.split("|")
        return cname, ctx, ctx.ops[o], ctx.preds[q]
    if ctx.ops:
        return cname, ctx, ctx.ops[rest], None
    return cname, ctx, None, ctx.preds[rest]


def has_constants(template: str) -> bool:
    _, ctx, op, pred = _parts(template)
    return "{a}" in ctx.doc or any(
        u is not None and (u.k or u.c) for u in (op, pred))


def train_templates(contexts: Optional[Sequence[str]] = None) -> list[str]:
    return [t for t in all_templates(contexts) if t not in HELDOUT_TEMPLATES]


def _units(template: str) -> list[str]:
    return template.split(":")[1].split("|")


def heldout_templates(contexts: Optional[Sequence[str]] = None) -> list[str]:
    """The unseen compositions: held-out templates each of whose operators/predicates is trained in
    some other template of the family (with a `contexts` subset, compositions whose parts the subset
    never trains are dropped: they would test an unseen word, not a composition)."""
    trained = {u for t in train_templates(contexts) for u in _units(t)}
    return [t for t in all_templates(contexts) if t in HELDOUT_TEMPLATES and set(_units(t)) <= trained]


def stable_hash(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def _primary_domain(template: str, key: str) -> list:
    _, ctx, op, pred = _parts(template)
    if key in ("k", "k2"):
        unit = op if key == "k" and op is not None and op.k else pred
        return list(range(unit.k[0], unit.k[1] + 1))
    if key == "a":
        return list(range(10))
    return list(LETTERS)


def _ranked_domain(template: str, key: str) -> tuple[list, int]:
    """A template's primary-constant domain in its seeded order, and the size of one reserved quarter."""
    dom = _primary_domain(template, key)
    return sorted(dom, key=lambda v: stable_hash("heldout", template, v)), max(1, len(dom) // HELDOUT_BUCKETS)


def heldout_values(template: str, key: str) -> set:
    """The values of a template's primary constant reserved for the held-out split: a seeded quarter
    of its domain (at least one value; training keeps the others)."""
    ranked, q = _ranked_domain(template, key)
    return set(ranked[:q])


def rl_values(template: str, key: str) -> set:
    """The values reserved for the RL split: the next seeded quarter (at least one value, never a
    held-out one; every primary domain has >= 3 values, so training keeps at least one)."""
    ranked, q = _ranked_domain(template, key)
    return set(ranked[q:2 * q])


def _primary_in(template: str, constants: tuple, values: Callable[[str, str], set]) -> bool:
    if not has_constants(template) or not constants:
        return False
    key, value = constants[0]
    return value in values(template, key)


def is_heldout_constants(template: str, constants: tuple) -> bool:
    """Held out iff the template has constants and its primary (first) constant is a held-out value:
    the (template, primary constant) pairs of held-out problems never occur in training."""
    return _primary_in(template, constants, heldout_values)


def is_rl_constants(template: str, constants: tuple) -> bool:
    """In the RL split iff the primary constant is an RL value (never in training, never held out)."""
    return _primary_in(template, constants, rl_values)


def is_train_constants(template: str, constants: tuple) -> bool:
    return not is_heldout_constants(template, constants) and not is_rl_constants(template, constants)


@dataclass
class Task:
    task_id: str
    split: str
    template: str
    constants: tuple
    entry_point: str
    signature: str
    docstring: str
    solution: str           # the whole reference function
    tests: list = field(default_factory=list)

    @property
    def prompt(self) -> str:
        """The question: the signature + docstring in a python fence, after the RL instruction."""
        code = f"def {self.signature}:\n    \"\"\"{self.docstring}\"\"\""
        return instruct_prompt(code, WHOLE_FUNCTION_INSTRUCTION)

    @property
    def response(self) -> str:
        return f"```python\n{self.solution}\n```"

    def to_record(self) -> dict:
        """The RL/eval problem record (execution.problems format: the completion is the whole program)."""
        return {"task_id": self.task_id, "prompt": self.prompt, "entry_point": self.entry_point,
                "tests": list(self.tests), "include_prompt": False, "canonical_solution": self.solution,
                "split": self.split, "template": self.template, "constants": list(self.constants)}


def _draw_op_params(rng: random.Random, units, p: dict) -> None:
    for i, u in enumerate(units):
        if u is None:
            continue
        key = "k2" if i == 1 and units[0] is not None else "k"
        if u.k:
            p[key] = rng.randint(*u.k)
        if u.c:
            p["c"] = rng.choice(LETTERS)
        if u.d:
            p["d"] = rng.choice([ch for ch in LETTERS if ch != p.get("c")])


def _constants(p: dict) -> tuple:
    return tuple((k, p[k]) for k in ("k", "k2", "a", "b", "c", "d") if k in p)


def _fill(u: Op, v: str, p: dict, key: str, code: bool) -> str:
    s = u.code if code else u.phrase
    return s.format(v=v, k=p.get(key, ""), c=p.get("c", ""), d=p.get("d", ""))


def _inputs(rng: random.Random, arg: str, p: dict) -> list:
    out = []
    for _ in range(NUM_TESTS):
        if arg == "int":
            out.append(rng.randint(-10, 20))
        elif arg == "n":
            out.append(rng.randint(0, 9))
        elif arg == "list":
            out.append([rng.randint(-10, 20) for _ in range(rng.randint(1, 6))])
        elif arg == "str":
            out.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 6))))
        else:
            out.append(["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5)))
                        for _ in range(rng.randint(1, 4))])
    return out


def make_task(template: str, rng: random.Random, task_id: str, split: str,
              accept: Callable[[tuple], bool] = lambda c: True, max_tries: int = 200) -> Task:
    """One problem of `template` whose constants satisfy `accept` (rejection sampling)."""
    cname, ctx, op, pred = _parts(template)
    for _ in range(max_tries):
        p: dict = {}
        _draw_op_params(rng, [op, pred], p)
        if "{a}" in ctx.doc:
            p["a"], p["b"] = rng.sample(range(0, 10), 2)
        if accept(_constants(p)):
            break
    else:
        raise RuntimeError(f"no accepted constants for {template} after {max_tries} tries")
    fname = rng.choice(FUNC_NAMES)
    arg = {"int": SCALAR_NAMES, "n": N_NAMES, "list": LIST_NAMES, "str": STR_NAMES, "words": WORD_NAMES}[ctx.arg]
    x = rng.choice(arg)
    v = rng.choice([e for e in ELEM_NAMES if e != x])
    if v == "i" or x == "i":
        v = "y"
    fmt = {"xs": x, "x": x, "v": v, "a": p.get("a"), "b": p.get("b")}
    for name, var in (("x", x), ("v", v), ("i", "i")):
        if op is not None:
            fmt[f"op_{name}"] = _fill(op, var, p, "k", code=False)
        if pred is not None:
            fmt[f"pred_{name}"] = _fill(pred, var, p, "k2" if op is not None else "k", code=False)
    doc = ctx.doc.format(**fmt)
    for name, var in (("x", x), ("v", v), ("i", "i")):
        if op is not None:
            fmt[f"op_{name}"] = _fill(op, var, p, "k", code=True)
        if pred is not None:
            fmt[f"pred_{name}"] = _fill(pred, var, p, "k2" if op is not None else "k", code=True)
    body = ctx.body.format(**fmt)
    signature = f"{fname}({x})"
    solution = f"def {signature}:\n{body}"
    pk = dict(p)
    if op is not None and pred is not None:
        qp = {"k": p.get("k2"), "c": p.get("c"), "d": p.get("d")}
    else:
        qp = pk
    o = (lambda val: op.fn(val, pk)) if op else None
    q = (lambda val: pred.fn(val, qp)) if pred else None
    tests = [f"assert {fname}({inp!r}) == {ctx.fn(inp, o, q, p)!r}" for inp in _inputs(rng, ctx.arg, p)]
    return Task(task_id, split, template, _constants(p), fname, signature, doc, solution, tests)


def generate(split: str, n: int, seed: int = 0, prefix: str = "mini",
             contexts: Optional[Sequence[str]] = None, reserve_rl: bool = True) -> list[Task]:
    """`n` problems of `split`, templates round-robin over a seeded shuffle; deterministic.
    `contexts`: only templates of these contexts (None = the whole family). `reserve_rl=False`: the
    train split also uses the RL values (the runs before the RL split; no `rl_constants` problem is
    then unseen in training)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    rng = random.Random(f"{seed}/{split}/{prefix}")
    member: Callable[[str, tuple], bool]  # (template, constants) -> whether the problem belongs to `split`
    if split == "train":
        pool = train_templates(contexts)
        member = is_train_constants if reserve_rl else (lambda t, c: not is_heldout_constants(t, c))
    elif split in ("heldout_constants", "rl_constants"):
        pool = [t for t in train_templates(contexts) if has_constants(t)]
        member = is_heldout_constants if split == "heldout_constants" else is_rl_constants
    else:
        pool, member = heldout_templates(contexts), (lambda t, c: True)
    if not pool:
        raise ValueError(f"no {split} templates in contexts {list(contexts or [])}")
    out: list[Task] = []
    order: list[str] = []
    seen = set()
    i = 0
    while len(out) < n:
        if not order:
            order = list(pool)
            rng.shuffle(order)
        t = order.pop()
        task = make_task(t, rng, f"{prefix}/{split}/{len(out)}", split, lambda c, t=t: member(t, c))
        i += 1
        if task.solution in seen and i < 50 * n:
            continue
        seen.add(task.solution)
        out.append(task)
    return out
