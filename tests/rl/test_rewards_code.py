"""Rewards on hand-written completions: values checked against the formula worked out by hand."""
import pytest

from megatron_diffu.execution.problems import Problem
from megatron_diffu.execution.protocol import single_python_block
from megatron_diffu.rl import rewards
from megatron_diffu.rl.rewards import (ExecConfig, RewardOutput, compute_rewards, format_score, pass_rates,
                                       register_reward, reward_stats)

PROBLEM = {"task_id": "toy/add", "prompt": "Write add(a, b).", "entry_point": "add",
           "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}


def fenced(code, before="Here is the code:\n", after="\n"):
    return f"{before}```python\n{code}\n```{after}"


CORRECT = fenced("def add(a, b):\n    return a + b")
WRONG = fenced("def add(a, b):\n    return a * b if a == 2 else a + b + 0 * b if a != 1 else 0")  # passes 2 of 3
SYNTAX = fenced("def add(a, b)\n    return a + b")
NO_FENCE = "def add(a, b):\n    return a + b\n"
TWO_FENCES = fenced("def add(a, b):\n    return a + b") + fenced("print(add(1, 2))", before="Usage:\n")
LOOP = fenced("def add(a, b):\n    while True:\n        pass")
FORK = fenced("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
              "def add(a, b):\n    return a + b")


@pytest.fixture(autouse=True)
def short_timeouts():
    old = ExecConfig(**rewards.EXEC.__dict__)
    rewards.configure_execution(timeout_s=1.5, n_workers=2)
    yield
    rewards.configure_execution(**old.__dict__)


def test_format_reward_cases():
    assert format_score(CORRECT) == 1.0
    assert format_score(SYNTAX) == 0.5
    assert format_score(NO_FENCE) == 0.0
    assert format_score(TWO_FENCES) == 0.0
    assert format_score("```js\nlet x = 1;\n```") == 0.0  # another language
    assert format_score("```python\nx = 1\n```") == 1.0  # closing fence may end the text
    assert format_score("```python\nx = (\n") == 0.0  # unclosed fence
    assert single_python_block(CORRECT) == "def add(a, b):\n    return a + b\n"


def test_combined_reward_on_hand_written_completions():
    comps = [CORRECT, WRONG, SYNTAX, NO_FENCE, TWO_FENCES, LOOP, FORK]
    out = compute_rewards(comps, [PROBLEM] * len(comps))
    # r = 2 * pass_rate + 0.5 * format, worked out by hand:
    expected_pass = [1.0, 2 / 3, 0.0, 0.0, 0.0, 0.0, 0.0]  # the fork bomb never reaches add()
    expected_format = [1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 1.0]
    assert out.components["pass_rate"] == pytest.approx(expected_pass)
    assert out.components["format"] == expected_format
    assert out.total == pytest.approx([2 * p + 0.5 * f for p, f in zip(expected_pass, expected_format)])


def test_never_ending_tests_are_cut_by_the_configured_timeout(monkeypatch):
    """A never-ending test runs with the configured timeout and comes back as a timeout (the run
    is bounded by the timeout, not by the program)."""
    from megatron_diffu.execution import sandbox

    seen = []
    real = sandbox.run_python

    def spy(code, timeout_s=5.0, memory_mb=1024, **kw):
        res = real(code, timeout_s, memory_mb, **kw)
        seen.append((timeout_s, res.status))
        return res

    monkeypatch.setattr(sandbox, "run_python", spy)
    assert pass_rates([LOOP], [dict(PROBLEM, tests=PROBLEM["tests"][:1])]) == [0.0]
    assert seen == [(1.5, "timeout")]


def test_pass_rate_with_a_test_program_and_problem_objects():
    prob = Problem("toy/neg", "neg", entry_point="neg", test="def check(candidate):\n    assert candidate(2) == -2\n",
                   tests=["assert neg(0) == 0"])
    right = fenced("def neg(x):\n    return -x")
    half = fenced("def neg(x):\n    return 0")  # passes the assert, fails check()
    assert pass_rates([right, half], [prob, prob]) == [1.0, 0.5]


def test_registry_and_custom_weights():
    @register_reward("toy_length")
    def length_reward(completions, problems):
        return [len(c) / 100 for c in completions]

    try:
        out = compute_rewards([NO_FENCE], [PROBLEM], {"format": 1.0, "toy_length": 2.0})
        assert out.total == pytest.approx([2.0 * len(NO_FENCE) / 100])
        with pytest.raises(KeyError, match="unknown reward function 'nope'"):
            compute_rewards([NO_FENCE], [PROBLEM], {"nope": 1.0})
    finally:
        rewards.REWARD_FUNCTIONS.pop("toy_length")


def test_reward_stats():
    out = RewardOutput([2.5, 2.5, 0.0, 0.5], {"format": [1, 1, 0, 1]}, {"format": 0.5})
    st = reward_stats(out, group_size=2)
    assert st["reward/mean"] == pytest.approx(1.375)
    assert st["reward/max"] == 2.5 and st["reward/min"] == 0.0
    assert st["reward/format_mean"] == pytest.approx(0.75)
    assert st["reward/zero_std_group_ratio"] == 0.5  # first group all equal, second not
    with pytest.raises(ValueError, match="groups of 3"):
        reward_stats(out, group_size=3)


def test_mismatched_lengths_and_bad_problems_are_reported():
    with pytest.raises(ValueError, match="2 completions for 1 problems"):
        pass_rates([CORRECT, CORRECT], [PROBLEM])
    with pytest.raises(ValueError, match="problems\\[0\\].*no tests"):
        pass_rates([CORRECT], [{"task_id": "x", "prompt": "p"}])


def test_pass_rate_counts_input_output_pairs():
    prob = {"task_id": "io", "prompt": "sum", "include_prompt": False,
            "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]}
    right = fenced("a, b = map(int, input().split())\nprint(a + b)")
    half = fenced("print(3)")
    assert pass_rates([right, half], [prob, prob]) == [1.0, 0.5]
