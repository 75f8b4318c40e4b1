"""Issue 16 item 8 for GRPO: a rollout batch's length (longest prompt P + N new tokens) follows the
data, so under FP8 the stage left-pads the prompts until every FP8 pass's rows x (P' + N) tokens
meet the GEMM rule (native: % 16); checked against a brute-force search and on a short FP8 run."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from grpo_stage_helpers import make_trainer, toy_config, write_toy_problems  # noqa: E402

COPIES = {"coupled": 3, "single": 2, "d1": 1}


@pytest.fixture()
def problems(tmp_path):
    return write_toy_problems(tmp_path / "toy.jsonl")


def _brute_force(longest, n, rows):
    """The smallest P >= longest with rows x (P + n) % 16 == 0 for every row count (native rule)."""
    p = longest
    while any(r * (p + n) % 16 for r in rows):
        p += 1
    return p


@pytest.mark.parametrize("estimator, no_grad, chunk", [("coupled", False, None), ("single", True, 3),
                                                       ("d1", True, None), ("d1", False, None)])
def test_prompt_padding_is_the_smallest_that_meets_the_rule(problems, one_thread, estimator, no_grad, chunk):
    over = {"model": {"fp8_format": "hybrid", "fp8_no_grad": no_grad},
            "grpo": {"estimator": estimator, "logp_chunk_size": chunk},
            "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 1}}
    trainer = make_trainer(toy_config(problems, over))
    stage, n, c = trainer.stage, trainer.cfg.sampling.max_new_tokens, COPIES[estimator]
    rows = [c * 2]
    if no_grad:  # the old/reference passes' chunks of this rank's 8 rows, and the remainder
        k = chunk or 2
        rows += [c * k] + ([c * (8 % k)] if 8 % k else [])
    for longest in range(1, 30):
        assert stage.padded_prompt_length(longest) == _brute_force(longest, n, rows), (longest, rows)
    trainer.cfg.model.fp8_format = None
    assert stage.padded_prompt_length(7) == 7  # no FP8: the batch's longest prompt


def test_an_fp8_grpo_step_trains_on_padded_rollouts(problems, one_thread):
    trainer = make_trainer(toy_config(problems, {"model": {"fp8_format": "hybrid"},
                                                 "training": {"train_iters": 1}}))
    trainer.train()
    buf = trainer.stage.buffer
    rows = COPIES["coupled"] * trainer.micro_batch_size
    assert rows * buf.tokens.shape[1] % 16 == 0 and buf.tokens.shape[1] - buf.prompt_length == 8
    longest = int(buf.real[:, :buf.prompt_length].sum(1).max())
    assert buf.prompt_length == _brute_force(longest, 8, [rows])
    assert all(math.isfinite(m["loss"]) for m in trainer.history)
