"""RL prompts and data against DiffuCoder's (apple/ml-diffucoder), written out plainly
(docs/ALGORITHMS.md sec. 5.1, 5.8, 6.4); test data: tests/assets/acecode_mini.jsonl, ten hand-made
records in AceCode-87K's format (`id`, `question`, `test_cases`, `inferences` with per-model pass rates).

- prompt (src/open_r1/grpo.py `make_conversation`, recipe `system_prompt`): system "You are a
  helpful assistant.", user = question + "\\nTest cases: " + test_cases[0], the test only when the
  question has no "\\n```\\n"; the prompt ids keep their last max_prompt_length tokens.
- completion mask (coupled_grpo.py): up to and including the first <|im_end|> (eod is not a stop).
- hard selection (recipes/process_data.py): accuracies = pass rates of qwen_coder_2.5 and
  llama3_instruct; keep mean <= 20th percentile of all means, then std >= 40th percentile of all stds.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_diffu.data.rl import (load_rl_problems, question_variants, select_by_difficulty, user_message,
                                    validate_record)
from megatron_diffu.execution.problems import ProblemFormatError
from megatron_diffu.stages.grpo.config import GRPOConfig
from megatron_diffu.stages.grpo.rollout import completion_mask_from

ROOT = Path(__file__).resolve().parents[3]
ACECODE = ROOT / "tests" / "assets" / "acecode_mini.jsonl"


def _records():
    return [json.loads(line) for line in ACECODE.read_text().splitlines()]


def test_acecode_fields_are_read_directly():
    rec = _records()[1]
    p = validate_record(rec, "acecode:2")
    assert p.task_id == "ace/1" and p.prompt == rec["question"] and list(p.tests) == rec["test_cases"]


def test_user_message_is_the_reference_template():
    p = validate_record(_records()[1], "x")
    assert user_message(p) == "Write a function f1 that returns 1.\nTest cases: assert f1() == 1"
    fenced = validate_record(dict(_records()[1], question="Complete:\n```\ndef f1():\n```\n"), "x")
    assert user_message(fenced) == "Complete:\n```\ndef f1():\n```\n"  # holds "\n```\n": no test shown
    assert user_message(p, show_first_test=False) == "Write a function f1 that returns 1."
    assert "Your code should pass this test:" in user_message(p, template="fenced")
    g = GRPOConfig()
    assert g.system_prompt == "You are a helpful assistant." and g.prompt_template == "diffucoder"
    assert g.long_prompts == "truncate_left" and g.completion_stop_tokens == ["im_end"]


def test_long_prompts_keep_their_last_tokens(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"task_id": "a", "prompt": "q", "tests": ["assert 1"], "prompt_ids": list(range(10))}) + "\n")
    assert load_rl_problems(str(path), max_prompt_length=8)[0].prompt_ids == list(range(2, 10))
    with pytest.raises(ProblemFormatError, match="10 tokens > max_prompt_length=8"):
        load_rl_problems(str(path), max_prompt_length=8, long_prompts="error")


def test_completion_mask_ends_at_the_first_im_end_only():
    IM_END, EOD, P = 62, 63, 2
    tokens = torch.tensor([[1, 2, 5, EOD, 6, IM_END, 7, 8],
                           [1, 2, 5, 6, 7, 8, 9, 9]])
    # the reference: eos_idx = first <|im_end|> (else the length); mask = positions <= eos_idx
    want = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(completion_mask_from(tokens, P, [IM_END]), want)
    assert completion_mask_from(tokens, P, [IM_END, EOD])[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]


def test_hard_medium_easy_selection():
    # means of (qwen, llama): 0, .25, .25, .5, .5, .625, .75, .875, 1, .875 -> P20 = .25, P25 = .3125, P75 = .84375
    # stds: 0, .25, 0, .5, 0, .375, .25, .125, 0, .125 -> P40 = .075
    recs = _records()
    ids = lambda rs: [r["id"] for r in rs]  # noqa: E731
    assert ids(select_by_difficulty(recs, "hard")) == ["ace/1"]  # ace/0 and ace/2 pass the mean cut, not the std cut
    assert ids(select_by_difficulty(recs, "medium")) == ["ace/3", "ace/4", "ace/5", "ace/6"]
    assert ids(select_by_difficulty(recs, "easy")) == ["ace/7", "ace/8", "ace/9"]


def test_question_variants():
    recs = _records()
    one = question_variants(recs[1])  # no "you"; best inference (llama, 0.5) starts with def
    assert len(one) == 2 and one[1]["task_id"] == "ace/1/signature"
    assert one[1]["question"] == ('Please complete the following problem:\n```\ndef f1():\n    """\n    '
                                  'Write a function f1 that returns 1.\n    """\n```\n')
    assert len(question_variants(recs[3])) == 1  # "You are given ...": kept as is
    assert len(question_variants(recs[4])) == 1  # best inference (the first of equal pass rates) is not a def


def test_preprocess_tool_selects_hard_problems(tmp_path):
    out = tmp_path / "hard.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_rl.py"), "--input", str(ACECODE), "--output",
                          str(out), "--difficulty", "hard"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in got] == ["ace/1", "ace/1/signature"]
    from megatron_diffu.data.tokenizer import build_tokenizer

    text = build_tokenizer("HuggingFaceTokenizer").decode(got[0]["prompt_ids"])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Write a function f1 that returns 1.\nTest cases: assert f1() == 1<|im_end|>\n<|im_start|>assistant\n")


def test_7b_recipe_validates_with_the_reference_values():
    import yaml

    from megatron_diffu.stages.grpo.config import GRPORunConfig

    cfg = GRPORunConfig.from_dict(yaml.safe_load((ROOT / "examples" / "diffucoder_7b_grpo.yaml").read_text()))
    cfg.validate(8)
    g, s, o = cfg.grpo, cfg.sampling, cfg.optimizer
    assert (g.num_generations, g.num_iterations, g.beta, g.epsilon_low, g.epsilon_high) == (10, 2, 0.01, 0.5, 0.5)
    assert (g.ref_model_sync_steps, g.ref_model_mixup_alpha, g.advantage_mode, g.max_prompt_length) == (64, 0.6, "loo", 200)
    assert (g.reward_weights, g.reward_timeout_s) == ([2.0, 0.5], 5.0)
    assert (s.max_new_tokens, s.steps, s.temperature, s.top_p, s.alg) == (256, 256, 1.0, 0.95, "entropy")
    assert (o.lr, o.min_lr / o.lr, o.lr_decay_style, o.adam_beta1, o.adam_beta2, o.weight_decay, o.clip_grad) == \
        (1e-6, pytest.approx(0.1), "cosine", 0.9, 0.99, 0.1, 0.2)
    assert cfg.resolved_global_batch_size(8) == 80 == 8 * g.num_generations
