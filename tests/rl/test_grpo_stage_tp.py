"""A whole GRPO step on the trainer at TP=2 equals TP=1: rollouts, rewards, advantages, the
old/reference/current coupled log-prob passes, the loss and every parameter's gradient (two
steps: the first of a rollout batch, and the second inner iteration that uses the stored old and
reference log-probs with a new mask seed)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from grpo_stage_helpers import make_trainer, toy_config, write_toy_problems  # noqa: E402

KEYS = ("loss", "kl", "clip_fraction", "entropy", "ratio_mean", "reward_mean", "completion_length",
        "zero_std_group_ratio", "completion_tokens")


def _gathered_grads(model, grid):
    out = {}
    for name, p in model.named_parameters():
        g = p.main_grad.detach().clone()
        dim = getattr(p, "tp_shard_dim", None)
        if dim is not None and grid.tp_size > 1:
            parts = [torch.empty_like(g) for _ in range(grid.tp_size)]
            dist.all_gather(parts, g.contiguous(), group=grid.tp_group)
            g = torch.cat(parts, dim=dim)
        out[name] = g.numpy()
    return out


def _two_steps(trainer):
    steps = []
    for _ in range(2):
        m = trainer.train_step()
        trainer.stage.on_step_end(trainer, m)
        steps.append(({k: float(m[k]) for k in KEYS}, _gathered_grads(trainer.model, trainer.grid),
                      trainer.stage.buffer.tokens.clone()))
    return steps


def _worker(rank, problems):
    from megatron_diffu.parallel.state import ProcessGrid

    over = {"grpo": {"beta": 0.05, "ref_model_sync_steps": 0}, "optimizer": {"lr": 1e-2, "min_lr": 1e-2}}
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    tp2 = _two_steps(make_trainer(toy_config(problems, over, {"parallel": {"tensor_model_parallel_size": 2}}), grid))
    tp1 = _two_steps(make_trainer(toy_config(problems, over), ProcessGrid.single()))
    return tp1, tp2


@pytest.mark.slow
def test_grpo_step_loss_and_gradients_tp2_equal_tp1(tmp_path):
    from megatron_diffu.testing import run_distributed

    problems = write_toy_problems(tmp_path / "toy.jsonl")
    results = run_distributed(_worker, 2, args=(problems,), timeout=300)
    for tp1, tp2 in results:
        for step, ((m1, g1, t1), (m2, g2, t2)) in enumerate(zip(tp1, tp2)):
            assert torch.equal(t1, t2), f"step {step + 1}: rollouts differ"
            for k in KEYS:
                assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), (step, k)
            assert g1.keys() == g2.keys()
            for name in g1:
                torch.testing.assert_close(torch.from_numpy(g2[name]), torch.from_numpy(g1[name]), rtol=1e-3,
                                           atol=1e-6, msg=f"step {step + 1}: {name}")
            assert max(abs(v).max() for v in g1.values()) > 0
        assert tp1[1][0]["kl"] > 0  # the second step really uses a reference that differs
