"""The GRPO stage against the reference implementation's semantics (apple/ml-diffucoder
`coupled_grpo.py`, TRL `SyncRefModelCallback` at the commit DiffuCoder pins), each written out
plainly here (docs/ALGORITHMS.md sec. 5.4, 5.6).

- Reference sync (TRL): every N steps, per parameter, ref <- alpha * policy + (1 - alpha) * ref,
  alpha = 0.6 by default; alpha = 1 is a copy.
- Loss normalisation (DiffuCoder compute_loss + HF gradient accumulation + DDP averaging): each
  micro-batch's loss is sum_tokens(loss) / #completion tokens OF THAT MICRO-BATCH, and the step's
  loss is the mean of those micro-batch losses.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from grpo_stage_helpers import make_trainer, toy_config, write_toy_problems  # noqa: E402

from megatron_diffu.stages.grpo.config import GRPOConfig  # noqa: E402
from megatron_diffu.stages.grpo.reference import ReferencePolicy  # noqa: E402


@pytest.fixture()
def problems(tmp_path):
    return write_toy_problems(tmp_path / "toy.jsonl")


def test_defaults_are_the_recipe_and_trl_values():
    g = GRPOConfig()
    assert g.ref_model_sync_steps == 64 and g.ref_model_mixup_alpha == 0.6
    assert g.loss_normalization == "micro_batch"
    assert any("ref_model_mixup_alpha" in e for e in GRPOConfig(ref_model_mixup_alpha=0.0).problems())
    assert any("loss_normalization" in e for e in GRPOConfig(loss_normalization="sequence").problems())


def test_sync_mixes_each_parameter():
    torch.manual_seed(0)
    policy, ref_model = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    before = {n: p.detach().clone().double() for n, p in ref_model.named_parameters()}
    ref = ReferencePolicy(ref_model)
    ref.sync_from(policy, 0.6)
    for n, p in ref_model.named_parameters():
        want = 0.6 * dict(policy.named_parameters())[n].detach().double() + 0.4 * before[n]
        # elementwise fp32 (no reduction: identical on any x86): a few ulp of operands <= ~1 in size
        torch.testing.assert_close(p.double(), want, rtol=0, atol=1e-6)
    ref.sync_from(policy, 1.0)
    for n, p in ref_model.named_parameters():
        assert torch.equal(p, dict(policy.named_parameters())[n])


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_stage_sync_at_step_n_is_the_mixup_of_policy_and_initial_reference(problems, alpha, one_thread):
    over = {"training": {"train_iters": 2}, "grpo": {"ref_model_sync_steps": 2, "ref_model_mixup_alpha": alpha}}
    initial = {n: p.detach().clone().double() for n, p in make_trainer(toy_config(problems, over)).model.named_parameters()}
    trainer = make_trainer(toy_config(problems, over))
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    moved = 0.0
    for n, p in trainer.stage.ref_model.named_parameters():
        want = alpha * policy[n].detach().double() + (1 - alpha) * initial[n]
        torch.testing.assert_close(p.double(), want, rtol=0, atol=1e-6, msg=n)  # elementwise: as above
        moved = max(moved, float((policy[n].double() - initial[n]).abs().max()))
    assert moved > 1e-4  # the policy did move, so the two alphas are told apart
    # only a hard copy makes the reference equal to the policy (its pass may then reuse the old pass)
    assert trainer.stage.reference_is_policy == (alpha == 1.0)


def _reference_step_loss(buf, micro_batch_size: int, per_micro_batch: bool) -> float:
    """Step 1 with one inner iteration: ratio = exp(logp - logp.detach()) = 1 and the reference is
    the policy (KL = 0), so each completion token's loss is -A of its row."""
    P = buf.prompt_length
    c = buf.completion_mask[:, P:].sum(1).double()
    per_row = -buf.advantages.double() * c  # sum over the row's tokens of -A
    if not per_micro_batch:
        return float(per_row.sum() / c.sum())
    means = [per_row[lo:lo + micro_batch_size].sum() / c[lo:lo + micro_batch_size].sum()
             for lo in range(0, len(c), micro_batch_size)]
    return float(torch.stack(means).mean())


@pytest.mark.parametrize("mode", ["micro_batch", "global_tokens"])
def test_step_loss_follows_the_normalisation(problems, mode, one_thread, monkeypatch):
    from megatron_diffu.stages.grpo import stage as stage_mod

    def varied_lengths(tokens, prompt_length, stop_ids):  # row r keeps its first 1 + (3 r mod 8) tokens
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for r in range(tokens.shape[0]):
            mask[r, prompt_length:prompt_length + 1 + (3 * r) % 8] = True
        return mask

    monkeypatch.setattr(stage_mod, "completion_mask_from", varied_lengths)
    over = {"training": {"train_iters": 1, "micro_batch_size": 2, "global_batch_size": 8},
            "grpo": {"num_iterations": 1, "loss_normalization": mode}}
    trainer = make_trainer(toy_config(problems, over))
    trainer.train()
    buf = trainer.stage.buffer
    got = trainer.history[0]["loss"]
    want = _reference_step_loss(buf, 2, mode == "micro_batch")
    other = _reference_step_loss(buf, 2, mode != "micro_batch")
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert abs(want - other) > 1e-4, "completion lengths too equal to tell the normalisations apart"
