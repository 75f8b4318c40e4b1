"""The instruct protocol: the prompt text of every caller, and today's rules for reading the code
back from an answer (first ```python block for evaluation, the single python block for the RL
format reward), pinned on hand-written answers and against the copies they replaced."""
import pytest

from megatron_diffu.execution.protocol import (INSTRUCTION, WHOLE_FUNCTION_INSTRUCTION, extract_code,
                                               instruct_messages, instruct_prompt, single_python_block)

PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'


def _old_first_code_block(text):
    """tools/evaluate.py `_chat_completion` / sft.py `_first_code_block` before the move (identical)."""
    start = text.find("```python")
    if start < 0:
        return text
    body = text[start + len("```python"):].lstrip(" \t").partition("\n")[2]
    return "\n" + body.split("```", 1)[0]


def _old_rewards_extract_code(completion):
    """rl/rewards.py `extract_code` before the move."""
    parts = completion.split("```")
    if len(parts) != 3:
        return None
    header, nl, body = parts[1].partition("\n")
    if not nl or header.strip().lower() != "python":
        return None
    return body


ANSWERS = [
    "    return a + b\n",                                                   # no fence: a raw continuation
    "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",      # one block with prose around
    "```python\ndef add(a, b):\n    return a + b\n```",                    # closing fence ends the text
    "```python\ndef add(a, b):\n    return a + b\n",                       # unclosed
    "```python\nx = 1\n```\nand\n```python\nx = 2\n```\n",                 # two python blocks
    "```js\nlet x = 1;\n```\n```python\nx = 2\n```",                       # another language first
    "```Python\nx = 1\n```",                                               # capitalised language
    "``` python \nx = 1\n```",                                             # spaces around the language
    "```python3\nx = 1\n```",                                              # python3
    "```py\nx = 1\n```",                                                   # py
    "```\nx = 1\n```",                                                     # no language
    "```python  \t\nx = 1\n```",                                           # trailing blanks after the fence
    "```python x = 1```",                                                  # no newline after the fence
    "```python",                                                           # a bare fence
    "",
]


def test_prompts_are_the_callers_texts():
    # tools/evaluate.py --chat and sft.py's HumanEval probe:
    assert instruct_prompt(PROMPT) == f"Complete the following Python function:\n```python\n{PROMPT}\n```"
    # data/rl.py's HumanEval RL set (the prompt is rstripped by the caller):
    assert instruct_prompt(PROMPT.rstrip(), WHOLE_FUNCTION_INSTRUCTION) == (
        "Complete the following Python function. Answer with the whole function in one ```python block.\n"
        f"```python\n{PROMPT.rstrip()}\n```")
    assert instruct_messages(PROMPT) == [{"role": "user", "content": instruct_prompt(PROMPT)}]
    assert instruct_messages(PROMPT, INSTRUCTION, system_prompt="be brief") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": instruct_prompt(PROMPT)}]


@pytest.mark.parametrize("answer, code", [
    ("    return a + b\n", "    return a + b\n"),  # no fence: unchanged
    ("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", "\ndef add(a, b):\n    return a + b\n"),
    ("```python\ndef f():\n    pass\n", "\ndef f():\n    pass\n"),  # unclosed: to the end
    ("```python\nx = 1\n```\nand\n```python\nx = 2\n```\n", "\nx = 1\n"),  # several: the first
    ("```js\nlet x = 1;\n```\n```python\nx = 2\n```", "\nx = 2\n"),  # the first *python* block
    ("```Python\nx = 1\n```", "```Python\nx = 1\n```"),  # "```Python" is not "```python": unchanged
    ("```py\nx = 1\n```", "```py\nx = 1\n```"),
    ("```python3\nx = 1\n```", "\nx = 1\n"),  # the rest of the fence line is skipped
    ("```python  \t\nx = 1\n```", "\nx = 1\n"),
    ("```python x = 1```", "\n"),  # no newline after the fence: nothing
])
def test_extract_code_takes_the_first_python_block(answer, code):
    assert extract_code(answer) == code


@pytest.mark.parametrize("answer, code", [
    ("    return a + b\n", None),  # no fence
    ("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", "def add(a, b):\n    return a + b\n"),
    ("```python\nx = 1\n```", "x = 1\n"),  # the closing fence may end the text
    ("```python\nx = 1\n", None),  # unclosed
    ("```python\nx = 1\n```\nand\n```python\nx = 2\n```\n", None),  # two blocks
    ("```js\nlet x = 1;\n```", None),  # another language
    ("```Python\nx = 1\n```", "x = 1\n"),  # any case
    ("``` python \nx = 1\n```", "x = 1\n"),  # spaces around the language
    ("```python3\nx = 1\n```", None),
    ("```\nx = 1\n```", None),  # no language
    ("```python x = 1```", None),  # no newline after the fence
])
def test_single_python_block_is_the_rl_format_rule(answer, code):
    assert single_python_block(answer) == code


@pytest.mark.parametrize("answer", ANSWERS)
def test_both_rules_equal_the_copies_they_replaced(answer):
    assert extract_code(answer) == _old_first_code_block(answer)
    assert single_python_block(answer) == _old_rewards_extract_code(answer)
