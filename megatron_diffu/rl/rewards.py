"""Code-execution rewards for coupled-GRPO (docs/ALGORITHMS.md sec. 5) and a pluggable registry.

    r = 2.0 * pass_rate + 0.5 * format          (weights configurable)

- format (`format_rule`, GRPO `reward_format_rule`). "strict" (default, DiffuCoder/open-r1's
  `get_code_format_reward`): the WHOLE completion must be: text without a fence, "```python" +
  newline, code without a fence, "```" + newline, end of text; trailing prose, "```Python",
  "``` python", a second block or extra blank lines score 0. One reading is decided here: our
  completions are cut before the first stop token, so a text that ends right at the closing
  fence is read as ending with the "\n" the reference's decoding gives it (the ChatML "\n" after
  `<|im_end|>`, special tokens skipped); docs/ALGORITHMS.md sec. 5.7. The code is stripped before
  `ast.parse` (1.0; 0.5 on a syntax error). "lenient" (the earlier rule,
  `execution.protocol.single_python_block`): exactly one ```python block anywhere (any case,
  spaces around the language, any text after it), unstripped body parsed.
- pass_rate = fraction of the problem's test cases that pass, each case a separate program
  (the extracted code + one assert, or + the problem's test program) run in the sandbox with a
  5 s timeout, all cases of all completions spread over `n_workers` parallel workers. With
  `timeout_policy` "zero_problem" (default, the reference: its evaluation script lets the 5 s
  `TimeoutExpired` escape, and its sandbox gives a script 30 s) a case that times out, or cases
  whose run times sum to more than `problem_budget_s` (30 s), make the problem's pass_rate 0;
  "per_case" (the earlier rule) lets a timeout cost only its own case and has no budget. It is
  computed only when format == 1 (0 otherwise, and nothing is executed). Where a case
  decomposes (an assert comparing a call with a constant, a stdin/stdout pair) or its check can
  be replayed, the sandboxed program only reports the candidate's outputs as data and the verdict
  is decided here (`execution.verdicts.judge`): a completion cannot make a wrong answer pass by
  patching builtins, hooks, `__eq__` tricks, forged output or an early exit. Other cases (and a
  replay that cannot decide) run in-process. The sandbox fails closed: without its jail nothing
  runs unless `allow_basic_sandbox` (GRPO `reward_allow_basic_sandbox`) asks for basic mode
  (docs/SANDBOX.md).

The format rules are `strict_python_block` and `execution.protocol.single_python_block`, the programs
`megatron_diffu.execution.verdicts.judged_case_programs` (in-process:
`test_case_programs`). Problems are
`megatron_diffu.execution.problems.Problem`s or dicts in the same JSONL format (task_id, prompt,
tests: list of asserts and/or test: program, entry_point).

Registry: a reward function is `fn(completions: list[str], problems: list[Problem|dict]) ->
list[float]`; register one with `@register_reward("name")`; `compute_rewards(completions,
problems, {"pass_rate": 2.0, "format": 0.5})` returns the weighted total and every component.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

from megatron_diffu.execution import sandbox as _sandbox
from megatron_diffu.execution.problems import Problem, as_problem, test_case_programs
from megatron_diffu.execution.verdicts import NOT_JUDGED, judge, judged_case_programs
from megatron_diffu.execution.protocol import single_python_block
from megatron_diffu.execution.sandbox import run_many

RewardFn = Callable[[Sequence[str], Sequence[Union[Problem, dict]]], list]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}
DEFAULT_WEIGHTS = {"pass_rate": 2.0, "format": 0.5}
FORMAT_RULES = ("strict", "lenient")  # strict: DiffuCoder/open-r1's whole-text rule | lenient: one block anywhere
TIMEOUT_POLICIES = ("zero_problem", "per_case")  # zero_problem: DiffuCoder's | per_case: a timeout costs one case
FENCE = "```"


@dataclass
class ExecConfig:
    """How test cases run: per-test timeout (s), parallel workers, sandbox memory (MiB), and
    `no_site` (stdlib-only interpreter, ~1.6x faster start; off so that tests may import
    installed packages)."""

    timeout_s: float = 5.0
    n_workers: int = 2
    memory_mb: int = 1024
    no_site: bool = False
    allow_basic_sandbox: bool = False  # run without the jail if it cannot be built (see docs/SANDBOX.md)
    format_rule: str = "strict"  # FORMAT_RULES
    timeout_policy: str = "zero_problem"  # TIMEOUT_POLICIES
    problem_budget_s: float = 30.0  # zero_problem: summed case run time over this zeroes the problem (0: none)


EXEC = ExecConfig()  # module default, overridable with configure_execution()


def configure_execution(timeout_s: Optional[float] = None, n_workers: Optional[int] = None,
                        memory_mb: Optional[int] = None, no_site: Optional[bool] = None,
                        allow_basic_sandbox: Optional[bool] = None, format_rule: Optional[str] = None,
                        timeout_policy: Optional[str] = None, problem_budget_s: Optional[float] = None) -> ExecConfig:
    """Change how the registered rewards read and execute completions (e.g. from the GRPO config)."""
    if format_rule is not None and format_rule not in FORMAT_RULES:
        raise ValueError(f"format_rule={format_rule!r}: choose one of {FORMAT_RULES}")
    if timeout_policy is not None and timeout_policy not in TIMEOUT_POLICIES:
        raise ValueError(f"timeout_policy={timeout_policy!r}: choose one of {TIMEOUT_POLICIES}")
    if problem_budget_s is not None and problem_budget_s < 0:
        raise ValueError(f"problem_budget_s={problem_budget_s} must be >= 0 (0: no budget)")
    if format_rule is not None:
        EXEC.format_rule = format_rule
    if timeout_policy is not None:
        EXEC.timeout_policy = timeout_policy
    if problem_budget_s is not None:
        EXEC.problem_budget_s = problem_budget_s
    if allow_basic_sandbox is not None:
        EXEC.allow_basic_sandbox = allow_basic_sandbox
        _sandbox.set_allow_basic(allow_basic_sandbox)
    if no_site is not None:
        EXEC.no_site = no_site
    if timeout_s is not None:
        EXEC.timeout_s = timeout_s
    if n_workers is not None:
        EXEC.n_workers = n_workers
    if memory_mb is not None:
        EXEC.memory_mb = memory_mb
    return EXEC


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARD_FUNCTIONS and REWARD_FUNCTIONS[name] is not fn:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn
    return deco


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARD_FUNCTIONS:
        raise KeyError(f"unknown reward function {name!r}; registered: {', '.join(sorted(REWARD_FUNCTIONS))}")
    return REWARD_FUNCTIONS[name]


def strict_python_block(completion: str) -> Optional[str]:
    """The code of a completion that is exactly: text without a fence, "```python\n", code
    without a fence, "```\n", end of text (DiffuCoder/open-r1's whole-text format rule); else None.

    Our completion text stops before the first stop token: one that ends right at the closing
    fence is read as ending with "\n" (what the reference's decoding shows after `<|im_end|>`;
    docs/ALGORITHMS.md sec. 5.7). The code is returned unstripped (as the reference executes it).
    """
    text = completion + "\n" if completion.endswith(FENCE) else completion
    parts = text.split(FENCE)  # leftmost, non-overlapping: a run of 4+ backticks breaks the rule
    if len(parts) != 3 or parts[2] != "\n" or not parts[1].startswith("python\n"):
        return None
    return parts[1][len("python\n"):]


def python_block(completion: str, rule: Optional[str] = None) -> Optional[str]:
    """The code a format rule (default: the configured `EXEC.format_rule`) extracts, or None."""
    rule = rule or EXEC.format_rule
    if rule == "strict":
        return strict_python_block(completion)
    if rule == "lenient":
        return single_python_block(completion)
    raise ValueError(f"format rule {rule!r}: choose one of {FORMAT_RULES}")


def format_score(completion: str, rule: Optional[str] = None) -> float:
    """1 if the completion's python block (per `rule`) parses, 0.5 if it does not, 0 without one.
    strict: the code is stripped before `ast.parse` (as the reference); lenient: parsed as is."""
    rule = rule or EXEC.format_rule
    code = python_block(completion, rule)
    if code is None:
        return 0.0
    try:
        ast.parse(code.strip() if rule == "strict" else code)
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source (Python < 3.12)
        return 0.5
    return 1.0


@register_reward("format")
def format_reward(completions: Sequence[str], problems: Sequence = ()) -> list:
    return [format_score(c) for c in completions]


def pass_rates(completions: Sequence[str], problems: Sequence[Union[Problem, dict]],
               exec_cfg: Optional[ExecConfig] = None) -> list:
    """Fraction of each problem's test cases passed by its completion (0 unless format == 1).
    timeout_policy zero_problem: 0 if a case timed out or the cases' run times sum past
    problem_budget_s; per_case: a timed-out case just fails."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems (need one problem each)")
    cfg = exec_cfg or EXEC
    # (completion index, program, decomposed cases or None, the in-process program of that case)
    jobs: list[tuple[int, str, object, str]] = []
    n_cases = [0] * len(completions)
    for i, (comp, prob) in enumerate(zip(completions, problems)):
        if format_score(comp, cfg.format_rule) != 1.0:
            continue
        problem, code = as_problem(prob, f"problems[{i}]"), python_block(comp, cfg.format_rule)
        programs = judged_case_programs(problem, code)
        n_cases[i] = len(programs)
        jobs += [(i, p, cases, inproc) for (p, cases), inproc in zip(programs, test_case_programs(problem, code))]
    passed = [0] * len(completions)
    timed_out = [False] * len(completions)
    spent = [0.0] * len(completions)  # run time of each case's deciding run, summed per completion

    def count(i: int, res) -> None:
        timed_out[i] |= res.status == "timeout"
        spent[i] += res.duration_s

    if jobs:  # every case of every completion, spread over the workers (results in job order)
        if cfg.allow_basic_sandbox:
            _sandbox.set_allow_basic(True)
        kw = dict(max_workers=cfg.n_workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, no_site=cfg.no_site)
        results = run_many([p for _, p, _, _ in jobs], **kw)
        again = []  # replayed checks that could not decide: those cases run in-process
        for (i, _, cases, inproc), res in zip(jobs, results):
            # decomposed cases: the program only reported outputs; the verdict is decided here
            if cases is None or not res.passed:
                passed[i] += res.passed
                count(i, res)
                continue
            ok, why, _ = judge(cases, res.stdout)
            if why.startswith(NOT_JUDGED):
                again.append((i, inproc))
                continue
            passed[i] += ok
            count(i, res)
        for (i, _), res in zip(again, run_many([p for _, p in again], **kw) if again else []):
            passed[i] += res.passed
            count(i, res)
    zero = [False] * len(completions)
    if cfg.timeout_policy == "zero_problem":
        budget = cfg.problem_budget_s
        zero = [t or (budget > 0 and s > budget) for t, s in zip(timed_out, spent)]
    elif cfg.timeout_policy != "per_case":
        raise ValueError(f"timeout_policy={cfg.timeout_policy!r}: choose one of {TIMEOUT_POLICIES}")
    return [passed[i] / n_cases[i] if n_cases[i] and not zero[i] else 0.0 for i in range(len(completions))]


@register_reward("pass_rate")
def pass_rate_reward(completions: Sequence[str], problems: Sequence) -> list:
    return pass_rates(completions, problems)


@dataclass
class RewardOutput:
    total: list  # weighted sum per completion
    components: dict = field(default_factory=dict)  # name -> list of raw (unweighted) values
    weights: dict = field(default_factory=dict)


def compute_rewards(completions: Sequence[str], problems: Sequence,
                    weights: Optional[Mapping[str, float]] = None) -> RewardOutput:
    """Weighted sum of registered reward functions (default: 2.0 * pass_rate + 0.5 * format)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    comps = {name: [float(x) for x in get_reward_fn(name)(completions, problems)] for name in weights}
    for name, vals in comps.items():
        if len(vals) != len(completions):
            raise ValueError(f"reward function {name!r} returned {len(vals)} values for {len(completions)} completions")
    total = [sum(weights[n] * comps[n][i] for n in weights) for i in range(len(completions))]
    return RewardOutput(total, comps, weights)


def code_reward(completions: Sequence[str], problems: Sequence, pass_rate_weight: float = 2.0,
                format_weight: float = 0.5) -> list:
    """r = pass_rate_weight * pass_rate + format_weight * format (the paper's reward)."""
    return compute_rewards(completions, problems, {"pass_rate": pass_rate_weight, "format": format_weight}).total


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def reward_stats(out: RewardOutput, group_size: Optional[int] = None) -> dict:
    """Scalars to log: mean/std/min/max of the total, mean of each component, and with
    `group_size` (completions per prompt, consecutive) the fraction of groups whose rewards are
    all equal (zero advantage: no learning signal from them)."""
    if not out.total:
        return {}
    mean, std = _mean_std(out.total)
    stats = {"reward/mean": mean, "reward/std": std, "reward/min": min(out.total), "reward/max": max(out.total)}
    for name, vals in out.components.items():
        stats[f"reward/{name}_mean"] = _mean_std(vals)[0]
    if group_size:
        if len(out.total) % group_size:
            raise ValueError(f"{len(out.total)} rewards do not split into groups of {group_size}")
        groups = [out.total[i:i + group_size] for i in range(0, len(out.total), group_size)]
        stats["reward/zero_std_group_ratio"] = sum(max(g) - min(g) < 1e-12 for g in groups) / len(groups)
    return stats
