"""The mini reproduction's data files, built from the task generator (tasks.py) and the stdlib:

- `problems_<split>.jsonl`  problem records (execution.problems format: task_id, prompt, entry_point,
  tests = assert strings, include_prompt = false, plus split/template/constants for the report);
- `pretrain.jsonl`          {"text"} documents: groups of training functions with docstring and
  tests, and real code (stdlib files, whole), for `tools/preprocess_data.py`;
- `sft.jsonl`               {"prompt", "response"} pairs of training problems, for `tools/preprocess_sft.py`;
- `tokenizer_corpus.txt`    the text a SentencePiece model is trained on (`data.tokenizer.train_sentencepiece`).
Only the train split enters pretraining and SFT data; RL problems come from the `rl_constants`
split (mini.Settings.rl_split), and no held-out problem enters any training data.
"""
from __future__ import annotations

import os
import random
import sysconfig
from typing import Iterable, Sequence

from megatron_diffu.common.atomic import atomic_write_jsonl, atomic_write_text
from megatron_diffu.repro.tasks import Task

STDLIB_EXCLUDE = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
                  "__pycache__", "ensurepip", "tkinter", "encodings")


def stdlib_files(max_bytes: int, seed: int = 0, max_file_bytes: int = 40_000) -> list[str]:
    """Whole .py files of the standard library (seeded choice, small files first-come), up to `max_bytes`."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_EXCLUDE)
        paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    random.Random(f"stdlib/{seed}").shuffle(paths)
    out, total = [], 0
    for p in paths:
        try:
            size = os.path.getsize(p)
            if size > max_file_bytes or size < 500:
                continue
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        out.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return out


def function_document(tasks: Sequence[Task]) -> str:
    """Functions with their docstring, each followed by its tests (how the pretraining corpus shows them)."""
    parts = []
    for t in tasks:
        body = t.solution.split("\n", 1)[1]
        parts.append(f"def {t.signature}:\n    \"\"\"{t.docstring}\"\"\"\n{body}\n\n\n" + "\n".join(t.tests) + "\n")
    return "\n\n".join(parts)


def pretrain_documents(train_tasks: Sequence[Task], stdlib_bytes: int, seed: int = 0,
                       per_doc: int = 3) -> list[dict]:
    rng = random.Random(f"pretrain/{seed}")
    tasks = list(train_tasks)
    rng.shuffle(tasks)
    docs = [{"text": function_document(tasks[i:i + per_doc])} for i in range(0, len(tasks), per_doc)]
    docs += [{"text": text} for text in stdlib_files(stdlib_bytes, seed)]
    rng.shuffle(docs)
    return docs


def sft_records(tasks: Iterable[Task]) -> list[dict]:
    """Instruction pairs: the RL/eval question (user turn) -> the reference in one ```python block."""
    return [{"prompt": t.prompt, "response": t.response} for t in tasks]


def write_jsonl(path: str, records: Sequence[dict]) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return atomic_write_jsonl(path, list(records))


def write_problems(path: str, tasks: Iterable[Task]) -> int:
    return write_jsonl(path, [t.to_record() for t in tasks])


def write_tokenizer_corpus(path: str, docs: Sequence[dict], sft: Sequence[dict]) -> str:
    """The pretraining documents plus the SFT pairs (so the prompt wording gets its own pieces)."""
    text = "\n".join([d["text"] for d in docs] + [r["prompt"] + "\n" + r["response"] for r in sft])
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    atomic_write_text(path, text)
    return path
