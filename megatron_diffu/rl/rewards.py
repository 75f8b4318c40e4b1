"""Code-execution rewards for coupled-GRPO (docs/ALGORITHMS.md sec. 5) and a pluggable registry.

    r = 2.0 * pass_rate + 0.5 * format          (weights configurable)

- format = 1 if the completion holds exactly one ```python fenced block and that block parses
  (`ast.parse`), 0.5 if it is such a block but does not parse, 0 otherwise (no fence, two or
  more fences, a fence of another language). This follows DiffuCoder/open-r1's
  `code_format_reward` (exactly one block in the whole text), with one leniency decided here:
  the closing fence may end the text (open-r1 requires a newline after it), because our
  completions are cut right after the last token before `<|im_end|>`.
- pass_rate = fraction of the problem's test cases that pass, each case a separate program
  (the extracted code + one assert, or + the problem's test program) run in the sandbox with a
  5 s timeout, all cases of all completions spread over `n_workers` parallel workers. It is
  computed only when format == 1 (0 otherwise, and nothing is executed). Where a case
  decomposes (an assert comparing a call with a constant, a stdin/stdout pair) or its check can
  be replayed, the sandboxed program only reports the candidate's outputs as data and the verdict
  is decided here (`execution.problems.judge`): a completion cannot make a wrong answer pass by
  patching builtins, hooks, `__eq__` tricks, forged output or an early exit. Other cases (and a
  replay that cannot decide) run in-process. The sandbox fails closed: without its jail nothing
  runs unless `allow_basic_sandbox` (GRPO `reward_allow_basic_sandbox`) asks for basic mode
  (docs/SANDBOX.md).

The format rule is `megatron_diffu.execution.protocol.single_python_block`, the programs
`megatron_diffu.execution.problems.judged_case_programs` (in-process:
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
from megatron_diffu.execution.problems import (NOT_JUDGED, Problem, as_problem, judge, judged_case_programs,
                                               test_case_programs)
from megatron_diffu.execution.protocol import single_python_block
from megatron_diffu.execution.sandbox import run_many

RewardFn = Callable[[Sequence[str], Sequence[Union[Problem, dict]]], list]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}
DEFAULT_WEIGHTS = {"pass_rate": 2.0, "format": 0.5}


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


EXEC = ExecConfig()  # module default, overridable with configure_execution()


def configure_execution(timeout_s: Optional[float] = None, n_workers: Optional[int] = None,
                        memory_mb: Optional[int] = None, no_site: Optional[bool] = None,
                        allow_basic_sandbox: Optional[bool] = None) -> ExecConfig:
    """Change how the registered pass-rate reward executes tests (e.g. from the GRPO config)."""
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


def format_score(completion: str) -> float:
    """1 if the completion's single ```python block parses, 0.5 if it does not, 0 without one."""
    code = single_python_block(completion)
    if code is None:
        return 0.0
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        return 0.5
    return 1.0


@register_reward("format")
def format_reward(completions: Sequence[str], problems: Sequence = ()) -> list:
    return [format_score(c) for c in completions]


def pass_rates(completions: Sequence[str], problems: Sequence[Union[Problem, dict]],
               exec_cfg: Optional[ExecConfig] = None) -> list:
    """Fraction of each problem's test cases passed by its completion (0 unless format == 1)."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems (need one problem each)")
    cfg = exec_cfg or EXEC
    # (completion index, program, decomposed cases or None, the in-process program of that case)
    jobs: list[tuple[int, str, object, str]] = []
    n_cases = [0] * len(completions)
    for i, (comp, prob) in enumerate(zip(completions, problems)):
        if format_score(comp) != 1.0:
            continue
        problem, code = as_problem(prob, f"problems[{i}]"), single_python_block(comp)
        programs = judged_case_programs(problem, code)
        n_cases[i] = len(programs)
        jobs += [(i, p, cases, inproc) for (p, cases), inproc in zip(programs, test_case_programs(problem, code))]
    passed = [0] * len(completions)
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
                continue
            ok, why, _ = judge(cases, res.stdout)
            if why.startswith(NOT_JUDGED):
                again.append((i, inproc))
            passed[i] += ok
        for (i, _), res in zip(again, run_many([p for _, p in again], **kw) if again else []):
            passed[i] += res.passed
    return [passed[i] / n_cases[i] if n_cases[i] else 0.0 for i in range(len(completions))]


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
