"""A whole GRPO step on the trainer at TP=2 equals TP=1: rollouts, rewards, advantages, the
old/reference/current coupled log-prob passes, the loss and every parameter's gradient (two
steps: the first of a rollout batch, and the second inner iteration that uses the stored old and
reference log-probs with a new mask seed). In the same 2 processes, PP=2 and DP=2 give the same
rollouts, losses, metrics and gradient norm (DP=2: the same gradients too), and a TP=2 GRPO
checkpoint resumes at TP=1 with the same reference model and rollout buffer.

Rollouts are discrete decisions on fp32 scores, and the layouts sum in different orders (their
logits differ by ~1e-7 here), so "the same rollouts" is a claim about decisions that fp32 rounding
cannot flip: `DecisionMargins` measures, for every decision of the TP=1 run, its margin against
the worst-case rounding bound K u max|logit| (K = accumulation depth, u = 2^-24). Every row whose
decisions all clear the bound must decode identically in every layout; a row with a decision
inside it (none with this config) takes the TP=1 run's decisions in the other layouts
(`DecisionMargins.replay`), so that the training math is still compared on equal inputs. At
least half of the rows must clear the bound.

The sampler's confidence is `maskgit_plus` (p of the drawn token), not the toy config's
`entropy`: the untrained 64-token model is near uniform (entropy 4.147 of log 64 = 4.159), where
the entropies of the candidate positions differ by ~1e-4 while the fp32 evaluation of a 64-term
entropy alone is only good to ~3e-5, so top-k-by-entropy is not decided by the model at fp32
precision (that is what flipped a token at TP=2 on AVX-512). p_tok differs by ~1e-3 between
positions with a bound ~100x smaller: every row clears it (smallest margin/bound ratio ~2.7)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from grpo_stage_helpers import (DecisionMargins, accumulation_depth, make_trainer, toy_config,  # noqa: E402
                                write_toy_problems)

KEYS = ("loss", "grad_norm", "kl", "clip_fraction", "entropy", "ratio_mean", "reward_mean", "completion_length",
        "zero_std_group_ratio", "completion_tokens")


def _gathered_grads(model, grid, weights=False):
    out = {}
    for name, p in model.named_parameters():
        g = (p if weights else p.main_grad).detach().clone()
        dim = getattr(p, "tp_shard_dim", None)
        if dim is not None and grid.tp_size > 1:
            parts = [torch.empty_like(g) for _ in range(grid.tp_size)]
            dist.all_gather(parts, g.contiguous(), group=grid.tp_group)
            g = torch.cat(parts, dim=dim)
        out[name] = g.numpy()
    return out


def _two_steps(trainer, grads=True):
    steps = []
    for _ in range(2):
        m = trainer.train_step()
        trainer.stage.on_step_end(trainer, m)
        steps.append(({k: float(m[k]) for k in KEYS}, _gathered_grads(trainer.model, trainer.grid) if grads else {},
                      trainer.stage.buffer.tokens.numpy().copy()))
    return steps


def _worker(rank, problems, ckdir):
    from megatron_diffu.parallel.state import ProcessGrid

    over = {"grpo": {"beta": 0.05, "ref_model_sync_steps": 0}, "optimizer": {"lr": 1e-2, "min_lr": 1e-2},
            "sampling": {"alg": "maskgit_plus"}}
    margins = DecisionMargins(accumulation_depth(toy_config(problems, over))).install()
    tp1 = _two_steps(make_trainer(toy_config(problems, over), ProcessGrid.single()))
    ratio = dict(margins.ratio)  # the TP=1 rollout's decisions: one rollout batch, sample indices 0..7
    # rows with a decision inside the rounding bound take TP=1's decisions in the other layouts
    margins.replay = {i: margins.decisions[i] for i, r in ratio.items() if not r > 1}

    def layout(par, grid):
        return make_trainer(toy_config(problems, over, {"parallel": par}), grid)

    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    tp2 = _two_steps(layout({"tensor_model_parallel_size": 2}, grid))
    pp2 = _two_steps(layout({"pipeline_model_parallel_size": 2}, ProcessGrid.build(pipeline_model_parallel_size=2)),
                     grads=False)
    dp2 = _two_steps(layout({}, ProcessGrid.build()))
    # a TP=2 checkpoint whose reference (synced at iteration 2) differs from the policy (iteration 3)
    saved = make_trainer(toy_config(problems, over, _ck(ckdir)), grid)
    saved.train()
    ref = _gathered_grads(saved.stage.ref_model, grid, weights=True)
    return tp1, tp2, pp2, dp2, ratio, (ref, saved.stage.buffer.tokens.numpy().copy())


def _ck(ckdir, load=False):
    return {"checkpoint": {"save": ckdir, "save_interval": 3, "load": ckdir if load else None},
            "grpo": {"ref_model_sync_steps": 2}, "training": {"train_iters": 3},
            "parallel": {"tensor_model_parallel_size": 1 if load else 2}}


@pytest.mark.slow
def test_grpo_step_at_tp2_pp2_dp2_equals_one_process(tmp_path):
    from megatron_diffu.testing import run_distributed

    problems = write_toy_problems(tmp_path / "toy.jsonl")
    ckdir = str(tmp_path / "ck")
    results = run_distributed(_worker, 2, args=(problems, ckdir), timeout=300)
    for tp1, tp2, pp2, dp2, ratio, _ in results:
        rows = tp1[0][2].shape[0]
        assert sorted(ratio) == list(range(rows))
        robust = [i for i in range(rows) if ratio[i] > 1]
        # the rollout comparison must cover most rows, or it would test nothing
        assert len(robust) >= rows / 2, f"decision margin / fp32 bound per row: {ratio}"
        for layout, other in (("tp2", tp2), ("pp2", pp2), ("dp2", dp2)):
            _compare(tp1, other, layout)
        assert tp1[1][0]["kl"] > 0  # the second step really uses a reference that differs
    # the TP=2 checkpoint resumes at TP=1: reference model (DCP resharded) and rollout buffer
    over = {"grpo": {"beta": 0.05}, "optimizer": {"lr": 1e-2, "min_lr": 1e-2}, "sampling": {"alg": "maskgit_plus"}}
    resumed = make_trainer(toy_config(problems, over, _ck(ckdir, load=True)))
    ref, tokens = results[0][-1]
    assert resumed.iteration == 3 and resumed.stage.ref_sync_iteration == 2
    assert (resumed.stage.buffer.tokens.numpy() == tokens).all()
    for name, p in resumed.stage.ref_model.named_parameters():
        torch.testing.assert_close(p.detach(), torch.from_numpy(ref[name]), rtol=0, atol=0, msg=name)
    policy = dict(resumed.model.named_parameters())
    assert any(not torch.equal(policy[n], p) for n, p in resumed.stage.ref_model.named_parameters())


def _compare(tp1, other, layout):
    for step, ((m1, g1, t1), (m2, g2, t2)) in enumerate(zip(tp1, other)):
        differ = sorted(set((t1 != t2).nonzero()[0].tolist()))
        assert not differ, f"{layout} step {step + 1}: rollout rows {differ} differ"
        for k in KEYS:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), (layout, step, k)
        if g2:
            assert g1.keys() == g2.keys()
            for name in g1:
                torch.testing.assert_close(torch.from_numpy(g2[name]), torch.from_numpy(g1[name]), rtol=1e-3,
                                           atol=1e-6, msg=f"{layout} step {step + 1}: {name}")
        assert max(abs(v).max() for v in g1.values()) > 0
