"""RL problem data: validation errors name file:line and the fix, chat-template prompts, the
HumanEval-derived training subset (split asserts pass with the canonical solutions), and the
completion mask (up to and including the first <|im_end|>) against a plain loop."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_diffu.data.rl import (RL_TASK_IDS, heldout_eval_task_ids, humaneval_rl_records, load_rl_problems,
                                    split_check_asserts)
from megatron_diffu.eval.humaneval import ProblemFormatError, load_humaneval
from megatron_diffu.stages.grpo.rollout import completion_mask_from

ROOT = Path(__file__).resolve().parents[3]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("bad, message", [
    ({"task_id": "a", "tests": ["assert 1"]}, "line 2.*no 'prompt' \\(or 'question'\\)"),
    ({"task_id": "a", "prompt": "q", "tests": [3]}, "line 2.*'tests' must be a list of assert"),
    ({"task_id": "a", "question": "q"}, "line 2.*has no tests"),
    ({"task_id": "a", "prompt": "q", "tests": ["assert 1"], "prompt_ids": [-1]}, "line 2.*re-run tools/preprocess_rl.py"),
    ("{not json", "line 2.*not valid JSON"),
])
def test_bad_records_name_the_line_and_the_fix(tmp_path, bad, message):
    good = {"task_id": "ok", "question": "q", "tests": ["assert True"], "prompt_ids": [1, 2]}
    path = _write(tmp_path / "p.jsonl", [good, bad])
    with pytest.raises(ProblemFormatError, match=message.replace("line ", "p.jsonl:")):
        load_rl_problems(path)


def test_long_prompts_and_foreign_vocabularies_are_refused(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"task_id": "a", "prompt": "q", "tests": ["assert 1"],
                                          "prompt_ids": list(range(10))}])
    with pytest.raises(ProblemFormatError, match="p.jsonl:1.*10 tokens > max_prompt_length=8"):
        load_rl_problems(path, max_prompt_length=8, long_prompts="error")
    with pytest.raises(ProblemFormatError, match="p.jsonl:1.*token id 9 >= vocabulary size 5"):
        load_rl_problems(path, vocab_size=5)


def test_preprocess_tool_writes_chat_prompts_with_the_first_test(tmp_path):
    from megatron_diffu.data.tokenizer import build_tokenizer

    src = _write(tmp_path / "in.jsonl", [{"task_id": "t/0", "question": "Write f returning 3.",
                                          "tests": ["assert f() == 3", "assert f() + 1 == 4"]}])
    out = tmp_path / "out.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_rl.py"), "--input", src, "--output", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rec = json.loads(out.read_text())
    tok = build_tokenizer("HuggingFaceTokenizer")
    text = tok.decode(rec["prompt_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "Write f returning 3.") and "assert f() == 3" in text
    assert "assert f() + 1 == 4" not in text  # only the first test is shown
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    bad = _write(tmp_path / "bad.jsonl", [{"task_id": "t/0", "question": "q"}])
    res = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_rl.py"), "--input", bad, "--output",
                          str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "bad.jsonl:1" in res.stderr and not (tmp_path / "x.jsonl").exists()


def test_humaneval_subset_is_fixed_disjoint_and_its_asserts_are_the_check_program():
    recs = humaneval_rl_records()
    assert [r["task_id"] for r in recs] == list(RL_TASK_IDS) == [f"HumanEval/{i}" for i in range(40)]
    assert not set(RL_TASK_IDS) & set(heldout_eval_task_ids()) and len(heldout_eval_task_ids()) == 124
    he = load_humaneval()
    split = [r for r in recs if "tests" in r]
    assert len(split) >= 35
    # the split asserts are exactly check()'s asserts with candidate renamed
    p = he["HumanEval/0"]
    asserts = split_check_asserts(p.test, p.entry_point)
    assert asserts[0] == "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    assert len(asserts) == p.test.count("assert candidate(")


def test_humaneval_subset_rewards_canonical_and_wrong_solutions():
    from megatron_diffu.rl.rewards import compute_rewards

    recs = humaneval_rl_records(RL_TASK_IDS[:2])
    he = load_humaneval()
    good = ["```python\n" + he[r["task_id"]].prompt + he[r["task_id"]].canonical_solution + "```" for r in recs]
    wrong = ["```python\n" + he[r["task_id"]].prompt + "    return None\n```" for r in recs]
    out = compute_rewards(good + wrong, recs + recs)
    assert out.total[:2] == [2.5, 2.5]  # 2.0 * all tests + 0.5 * format
    assert all(0.5 <= t < 2.5 for t in out.total[2:])


def test_completion_mask_stops_after_the_first_stop_token():
    P, stops = 3, [62, 63]
    tokens = torch.tensor([[1, 2, 3, 5, 62, 7, 62], [0, 1, 2, 5, 6, 7, 8], [1, 2, 3, 63, 62, 9, 9]])
    want = torch.zeros_like(tokens, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):  # plain loop
        for j in range(P, len(row)):
            want[b, j] = True
            if row[j] in stops:
                break
    assert torch.equal(completion_mask_from(tokens, P, stops), want)
