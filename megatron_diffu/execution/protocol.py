"""The instruct protocol: how a code prompt is put to an instruct model, and how the code is read
back from its answer. Standard library only. Every caller (SFT's HumanEval probe, `tools/evaluate.py
--chat`, the RL problem set, the RL format reward) uses these, so a change here changes them all.

Prompt: `instruct_prompt(code, instruction)` is the instruction line, then the code in a ```python
fence:

    Complete the following Python function:
    ```python
    def f(x):
        \"\"\"...\"\"\"
    ```

`INSTRUCTION` is the evaluation wording; `WHOLE_FUNCTION_INSTRUCTION` the RL training set's, which
also asks for the answer format the RL format reward checks.

Reading the answer back, two rules (both kept bit-for-bit from the code they replace):
- `extract_code(answer)` (evaluation): the FIRST ```python block, returned with a leading newline so
  that it can follow the prompt (it redefines the prompt's function, which is legal Python); an
  answer without a ```python fence is returned unchanged (a base model's raw continuation).
- `single_python_block(answer)` (the RL format rule): the body of the ONLY fenced block of the
  answer when its language is python (any case), else None (no fence, two or more, another
  language, unclosed).
"""
from __future__ import annotations

from typing import Optional

FENCE = "```"
PYTHON_FENCE = FENCE + "python"
INSTRUCTION = "Complete the following Python function:"
WHOLE_FUNCTION_INSTRUCTION = ("Complete the following Python function. "
                              "Answer with the whole function in one ```python block.")


def instruct_prompt(code: str, instruction: str = INSTRUCTION) -> str:
    """`instruction`, a newline, then `code` in a ```python fence (no newline after the closing fence).

    `code` is used as given (callers that want it without trailing whitespace strip it first).
    """
    return f"{instruction}\n{PYTHON_FENCE}\n{code}\n{FENCE}"


def instruct_messages(code: str, instruction: str = INSTRUCTION,
                      system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """The chat messages for `instruct_prompt(code, instruction)`: one user turn (after an optional
    system turn), ready for `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": instruct_prompt(code, instruction)})
    return messages


def extract_code(answer: str) -> str:
    """The code to put after the prompt, from an instruct model's answer (evaluation rule).

    The first "```python" (exactly this spelling: "```Python" or "```py" do not count) starts the
    block; the rest of that line (e.g. "3" of "```python3") is skipped; the block ends at the next
    "```" or at the end of the text. The block is returned with a "\\n" in front (just "\\n" when
    no newline follows the fence). Without a "```python" the answer is returned unchanged.
    """
    start = answer.find(PYTHON_FENCE)
    if start < 0:
        return answer
    body = answer[start + len(PYTHON_FENCE):].lstrip(" \t").partition("\n")[2]
    return "\n" + body.split(FENCE, 1)[0]


def single_python_block(answer: str) -> Optional[str]:
    """The body of the single fenced block of `answer` if it is python, else None (RL format rule).

    The answer must hold exactly two "```" (one block in the whole text); the opening fence's line
    must be "python" in any case, surrounding spaces allowed ("```Python", "``` python "), and be
    followed by a newline. The closing fence may end the text. The body is returned as is (up to
    the closing fence, its final newline included).
    """
    parts = answer.split(FENCE)
    if len(parts) != 3:
        return None
    header, nl, body = parts[1].partition("\n")
    if not nl or header.strip().lower() != "python":
        return None
    return body
