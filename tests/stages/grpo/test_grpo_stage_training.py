"""The GRPO stage on the trainer: a learning signal on a toy reward, resume equivalence (mid
rollout batch, with the reference model restored from its checkpoint), and config errors."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from grpo_stage_helpers import TARGET, make_trainer, toy_config, write_toy_problems  # noqa: E402


@pytest.fixture()
def problems(tmp_path):
    return write_toy_problems(tmp_path / "toy.jsonl")


@pytest.mark.slow
def test_average_reward_rises_on_a_toy_reward(problems, one_thread):
    """Reward = fraction of completion tokens equal to one token id: ~1/64 at the start."""
    cfg = toy_config(problems, {"training": {"train_iters": 30, "global_batch_size": 16, "micro_batch_size": 8},
                                "grpo": {"num_generations": 8, "num_iterations": 1},
                                "optimizer": {"lr": 3e-3, "min_lr": 3e-3}})
    trainer = make_trainer(cfg)
    trainer.train()
    rewards = [h["reward_mean"] for h in trainer.history]
    print("reward per step", np.round(rewards, 3).tolist())
    assert np.mean(rewards[:5]) < 0.15
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3
    # the completions really contain the target token now (decoded from the rollout buffer)
    buf = trainer.stage.buffer
    gen = buf.tokens[:, buf.prompt_length:][buf.completion_mask[:, buf.prompt_length:]]
    assert (gen == TARGET).float().mean() > 0.3


def test_resume_mid_rollout_batch_continues_with_equal_losses(problems, tmp_path, one_thread):
    """Straight 5 steps vs 3 steps + resume: iteration 4 is the 2nd inner iteration of the rollout
    batch made at iteration 3 (restored from the stage state), and the reference synced at
    iteration 2 comes back from the checkpoint (the trainer's checkpointer saves it as `reference.*`)."""
    over = {"training": {"train_iters": 5}, "grpo": {"ref_model_sync_steps": 2, "beta": 0.05}}
    straight = make_trainer(toy_config(problems, over))
    straight.train()
    ck = {"checkpoint": {"save": str(tmp_path / "ck"), "load": str(tmp_path / "ck"), "save_interval": 3}}
    first = make_trainer(toy_config(problems, over, ck, {"training": {"train_iters": 5, "exit_interval": 3}}))
    first.train()
    assert first.iteration == 3
    from megatron_diffu.training.checkpointing import checkpoint_tensor_shapes
    saved = checkpoint_tensor_shapes(tmp_path / "ck" / "iter_0000003")
    ref_keys = {k for k in saved if k.startswith("reference.")}
    assert ref_keys == {"reference." + k[len("model."):] for k in saved if k.startswith("model.")}
    resumed = make_trainer(toy_config(problems, over, ck))
    assert resumed.iteration == 3 and resumed.stage.ref_sync_iteration == 2
    assert resumed.stage.buffer is not None and resumed.stage.buffer.rollout_index == 1
    for (n, p), (_, q) in zip(first.stage.ref_model.named_parameters(), resumed.stage.ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    resumed.train()
    assert [h["iteration"] for h in resumed.history] == [4, 5]
    for a, b in zip(straight.history[3:], resumed.history):
        for k in ("loss", "kl", "reward_mean", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["iteration"], k)
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_config_errors_name_the_field_and_fix(problems):
    from megatron_diffu.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of grpo.num_generations=4"):
        toy_config(problems, {"training": {"global_batch_size": 6, "micro_batch_size": 2}}).validate(1)
    with pytest.raises(ConfigError, match="--temperature 1.0"):
        toy_config(problems, {"sampling": {"temperature": 0.0}}).validate(1)
    with pytest.raises(ConfigError, match="unknown \\['nope'\\]"):
        toy_config(problems, {"grpo": {"reward_funcs": ["nope"]}}).validate(1)


def _plain_logp(model, tokens, real, prompt_length, sample_index, seed, mask_id):
    """The coupled estimate of docs/ALGORITHMS.md sec. 5 written plainly: one sequence at a time, one
    full-vocabulary forward per copy. Noise keys: t from (seed, -1, "coupled_t"), R from
    (seed, sample index, "coupled_r") (rl/coupled.py's documented keys)."""
    from megatron_diffu.diffusion.objective import keyed_generator

    t = 0.2 + 0.6 * float(torch.rand((), generator=keyed_generator(seed, -1, "coupled_t")))
    rows = []
    for b in range(tokens.shape[0]):
        L = tokens.shape[1]
        R = torch.rand(L, generator=keyed_generator(seed, int(sample_index[b]), "coupled_r"))
        gen = torch.arange(L) >= prompt_length
        out = torch.zeros(L)
        for masked, w in ((gen, 0.5), (gen & (R < t), 0.5 / t), (gen & (R >= t), 0.5 / (1 - t))):
            x = torch.where(masked, torch.tensor(mask_id), tokens[b])
            logits = model(x[None], attention_mask=real[b][None])[0].float()
            lp = torch.log_softmax(logits, -1).gather(-1, tokens[b][:, None])[:, 0]
            out = out + torch.where(masked, w * lp, torch.zeros_like(lp))
        rows.append(out)
    return torch.stack(rows)


def test_second_inner_step_equals_a_plain_implementation(problems, one_thread):
    """Step 2 = inner iteration 1 of rollout batch 0: old log-probs from the rollout-time policy,
    reference = the initial model, current = the policy after step 1, all with mask seed 1."""
    import copy

    from megatron_diffu.stages.grpo.logprobs import mask_seed
    from megatron_diffu.model.transformer import DiffusionTransformer

    cfg = toy_config(problems, {"grpo": {"beta": 0.05, "ref_model_sync_steps": 0}, "training": {"train_iters": 2},
                                "optimizer": {"lr": 1e-2, "min_lr": 1e-2}})
    tr = make_trainer(cfg)
    init = copy.deepcopy(tr.model.state_dict())
    m1 = tr.train_step()
    tr.stage.on_step_end(tr, m1)
    after1 = copy.deepcopy(tr.model.state_dict())
    m2 = tr.train_step()
    grads = {n: p.main_grad.clone() for n, p in tr.model.named_parameters()}

    buf, g = tr.stage.buffer, cfg.grpo
    seed = mask_seed(cfg.data.seed, 0, 1)
    args = (buf.tokens, buf.real, buf.prompt_length, buf.sample_index, seed, 60)
    old_model = DiffusionTransformer(cfg.model)
    old_model.load_state_dict(init)
    cur = DiffusionTransformer(cfg.model)
    cur.load_state_dict(after1)
    with torch.no_grad():
        old = _plain_logp(old_model, *args)  # the reference model is the same initial policy
    comp = buf.completion_mask.float()
    torch.testing.assert_close(buf.old_logp[1] * comp, old * comp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(buf.ref_logp[1] * comp, old * comp, rtol=1e-4, atol=1e-5)
    logp = _plain_logp(cur, *args)
    loss = 0.0
    for b in range(logp.shape[0]):
        for n in range(logp.shape[1]):
            if not buf.completion_mask[b, n]:
                continue
            ratio = torch.exp(logp[b, n] - old[b, n])
            a = float(buf.advantages[b])
            clipped = torch.clamp(ratio, 1 - g.epsilon_low, 1 + g.epsilon_high)
            d = old[b, n] - logp[b, n]
            loss = loss - torch.min(ratio * a, clipped * a) + g.beta * (torch.exp(d) - d - 1)
    loss = loss / comp.sum()
    loss.backward()
    assert m2["loss"] == pytest.approx(float(loss), rel=1e-4, abs=1e-7)
    assert m2["kl"] > 0 and float(buf.advantages.abs().max()) > 0
    for n, p in cur.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)
