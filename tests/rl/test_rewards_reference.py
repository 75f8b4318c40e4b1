"""The code rewards against DiffuCoder's (apple/ml-diffucoder src/open_r1/rewards.py,
utils/code_providers.py), their semantics restated here in plain words, not their code:

Format (`get_code_format_reward`): the whole completion text must be
    [text with no "```"] "```python" NEWLINE [code with no "```"] "```" NEWLINE <end of text>
else 0.0; then the code, stripped, must `ast.parse` (1.0) or not (0.5).

Code (`code_reward`, only when format == 1): one script per completion runs its cases one after
another, each `python3 -c code + "\n" + case` with a 5 s timeout; a non-zero exit fails the case,
and the script prints passed / total. A case that runs past 5 s raises out of the script (the
timeout is not caught), so no pass rate is printed and the completion gets 0; a script that
runs past the sandbox's 30 s gets 0 as well.

Our completion text is cut before the first stop token; the reference decodes every completion
token with special tokens skipped (coupled_grpo.py), so it sees the ChatML "\n" after
<|im_end|>: a text of ours that ends at the closing fence is read as ending with that "\n".
"""
import random

import pytest

from megatron_diffu.rl import rewards
from megatron_diffu.rl.rewards import ExecConfig, format_score, pass_rates, strict_python_block


def reference_code(text):
    """The code the reference format rule accepts in `text`, or None (written from the rule above)."""
    open_at = text.find("```")
    if open_at < 0 or not text.startswith("```python\n", open_at):
        return None
    code_from = open_at + len("```python\n")
    close_at = text.find("```", code_from)
    if close_at < 0 or text[close_at:] != "```\n":
        return None
    return text[code_from:close_at]


def reference_format(text):
    import ast

    code = reference_code(text)
    if code is None:
        return 0.0
    try:
        ast.parse(code.strip())
    except SyntaxError:
        return 0.5
    return 1.0


CASES = [  # (completion as the reference sees it, its score under the reference rule)
    ("Here is the code:\n```python\ndef f():\n    return 1\n```\n", 1.0),
    ("```python\nx = 1\n```\n", 1.0),
    ("```python\nx = 1```\n", 1.0),  # the closing fence may end the code's last line
    ("```python\n```\n", 1.0),  # empty code parses
    ("```python\n    x = 1\n```\n", 1.0),  # stripped before ast.parse
    ("```python\ndef f()\n    return 1\n```\n", 0.5),  # syntax error
    ("```python\nx = 1\n```\nThis prints nothing.", 0.0),  # trailing prose
    ("```python\nx = 1\n```\nThis prints nothing.\n", 0.0),
    ("```Python\nx = 1\n```\n", 0.0),
    ("``` python\nx = 1\n```\n", 0.0),
    ("```python \nx = 1\n```\n", 0.0),
    ("```python x = 1\n```\n", 0.0),
    ("```python\nx = 1\n```\n\n", 0.0),  # an extra blank line
    ("```python\nx = 1\n```\n\n\n", 0.0),
    ("```python\nx = 1\n```\n```python\ny = 2\n```\n", 0.0),  # a second block
    ("Use ``` fences:\n```python\nx = 1\n```\n", 0.0),  # a fence in the text before
    ("```python\nx = '```'\n```\n", 0.0),  # a fence inside the code
    ("````python\nx = 1\n```\n", 0.0),
    ("```python\nx = 1````\n", 0.0),
    ("```js\nlet x = 1;\n```\n", 0.0),
    ("def f():\n    return 1\n", 0.0),  # no fence
    ("```python\nx = (\n", 0.0),  # unclosed
]


@pytest.mark.parametrize("text,want", CASES)
def test_strict_format_scores_as_the_reference(text, want):
    assert reference_format(text) == want  # the plain restatement agrees with the table
    assert format_score(text) == want  # strict is the default
    assert format_score(text, "strict") == want


def test_strict_format_agrees_with_the_reference_on_random_texts():
    pieces = ["```", "`", "``", "python", "Python", "\n", " ", "x = 1", "(", "text", "```python\n", "```\n"]
    g = random.Random(5)
    hits = 0
    for _ in range(4000):
        text = "".join(g.choice(pieces) for _ in range(g.randint(1, 8)))
        if not text.endswith("```"):  # texts ending at a fence: the cut reading, tested below
            assert format_score(text, "strict") == reference_format(text), repr(text)
            hits += reference_code(text) is not None
    assert hits > 20  # the random texts do reach the accepting case


def test_a_completion_cut_at_the_closing_fence_reads_as_the_reference_decoding():
    """Tokens "...```" <|im_end|> "\\n" <pad>...: the reference decodes "...```\\n" (specials skipped,
    the ChatML newline kept); our text stops before <|im_end|>, at "...```"."""
    ours = "Here it is:\n```python\nx = 1\n```"
    assert format_score(ours) == reference_format(ours + "\n") == 1.0
    assert strict_python_block(ours) == "x = 1\n"
    # a text of ours already ending with "```\n": the reference also scores it 1.0 when nothing
    # textual follows <|im_end|>; an extra blank line stays 0 either way
    assert format_score(ours + "\n") == 1.0
    assert format_score(ours + "\n\n") == 0.0
    assert format_score(ours + " ") == 0.0


def test_lenient_rule_keeps_the_earlier_scores():
    assert format_score("```python\nx = 1\n```\nThis prints nothing.", "lenient") == 1.0
    assert format_score("```Python\nx = 1\n```\n", "lenient") == 1.0
    assert format_score("``` python\nx = 1\n```\n\n", "lenient") == 1.0
    assert format_score("```python\n    x = 1\n```\n", "lenient") == 0.5  # parsed unstripped
    assert format_score("```python\nx = 1\n```\n```python\ny = 2\n```\n", "lenient") == 0.0
    with pytest.raises(ValueError, match="format rule"):
        format_score("x", "loose")


# ------------------------------------------------------------------------------------ timeouts
HANGS_ON_2 = "Here:\n```python\ndef f(x):\n    while x == 2:\n        pass\n    return x\n```\n"
SLOW = "Here:\n```python\nimport time\n\ndef f(x):\n    time.sleep(0.6)\n    return x\n```\n"
PROBLEM = {"task_id": "toy/f", "prompt": "Write f(x) returning x.", "entry_point": "f",
           "tests": ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"]}


@pytest.fixture(autouse=True)
def restore_exec():
    old = ExecConfig(**rewards.EXEC.__dict__)
    rewards.configure_execution(timeout_s=1.5, n_workers=2)
    yield
    rewards.configure_execution(**old.__dict__)


def test_a_timed_out_case_zeroes_the_problem_by_default():
    assert rewards.EXEC.timeout_policy == "zero_problem" and rewards.EXEC.problem_budget_s == 30.0
    right = "```python\ndef f(x):\n    return x\n```\n"
    # the reference: case 2 never ends -> its 5 s timeout escapes the script -> 0; the other one passes all
    assert pass_rates([HANGS_ON_2, right], [PROBLEM, PROBLEM]) == [0.0, 1.0]
    rewards.configure_execution(timeout_policy="per_case")  # the earlier rule: the timeout costs one case
    assert pass_rates([HANGS_ON_2, right], [PROBLEM, PROBLEM]) == pytest.approx([2 / 3, 1.0])


def test_the_per_problem_time_budget():
    # three cases of >= 0.6 s each: more than a 1 s budget in total (the reference's is 30 s)
    rewards.configure_execution(problem_budget_s=1.0)
    assert pass_rates([SLOW], [PROBLEM]) == [0.0]
    rewards.configure_execution(problem_budget_s=0.0)  # no budget
    assert pass_rates([SLOW], [PROBLEM]) == [1.0]
    rewards.configure_execution(problem_budget_s=1.0, timeout_policy="per_case")  # per_case: no budget
    assert pass_rates([SLOW], [PROBLEM]) == [1.0]
    rewards.configure_execution(problem_budget_s=30.0, timeout_policy="zero_problem")
    assert pass_rates([SLOW], [PROBLEM]) == [1.0]


def test_wrong_answers_keep_partial_credit_under_the_reference_policy():
    half = "```python\ndef f(x):\n    return 1 if x == 1 else 0\n```\n"  # passes 1 of 3, no timeout
    assert pass_rates([half], [PROBLEM]) == pytest.approx([1 / 3])


def test_pass_rate_uses_the_configured_format_rule():
    prose = "```python\ndef f(x):\n    return x\n```\nDone."
    assert pass_rates([prose], [PROBLEM]) == [0.0]  # strict: format 0, nothing runs
    rewards.configure_execution(format_rule="lenient")
    assert pass_rates([prose], [PROBLEM]) == [1.0]


def test_grpo_config_defaults_and_checks():
    from megatron_diffu.stages.grpo.config import GRPOConfig

    g = GRPOConfig()
    assert (g.reward_format_rule, g.reward_timeout_policy, g.reward_problem_budget_s) == ("strict", "zero_problem", 30.0)
    e = GRPOConfig(reward_format_rule="x", reward_timeout_policy="y", reward_problem_budget_s=-1).problems()
    assert any("reward_format_rule" in m for m in e) and any("reward_timeout_policy" in m for m in e)
    assert any("reward_problem_budget_s" in m for m in e)
    with pytest.raises(ValueError, match="timeout_policy"):
        rewards.configure_execution(timeout_policy="nope")
