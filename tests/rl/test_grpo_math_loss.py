"""GRPO advantages and loss against plain references; TP=2 equals TP=1 for loss and gradients."""
import math

import pytest
import torch
import torch.distributed as dist

from megatron_diffu.rl.advantages import group_advantages, reward_stats, zero_std_group_ratio
from megatron_diffu.rl.loss import grpo_loss, k3_kl


# ---------------------------------------------------------------------------------- advantages
def test_leave_one_out_advantage_matches_plain_loop():
    rewards = torch.tensor([2.5, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.5, 0.5])
    g = 4
    want = []
    for k, r in enumerate(rewards.tolist()):
        grp = rewards[(k // g) * g:(k // g + 1) * g].tolist()
        others = [x for j, x in enumerate(grp) if j != k % g]
        want.append(r - sum(others) / len(others))
    torch.testing.assert_close(group_advantages(rewards, g), torch.tensor(want))
    assert zero_std_group_ratio(rewards, g) == pytest.approx(1 / 3)
    assert reward_stats(rewards, g)["zero_std_group_ratio"] == pytest.approx(1 / 3)
    assert (group_advantages(rewards, 1) == 0).all()


def test_mean_std_advantage_and_bad_shapes():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = group_advantages(rewards, 3, mode="mean_std")
    torch.testing.assert_close(a[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4))
    assert (a[3:] == 0).all()
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


# ---------------------------------------------------------------------------------- loss
def test_kl_is_zero_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 9, generator=g) * 5
    mask = torch.rand(3, 9, generator=g) < 0.8
    out = grpo_loss(logp.clone().requires_grad_(), torch.tensor([1.0, -0.5, 0.0]), mask,
                    old_logp=logp, ref_logp=logp, beta=0.3)
    assert out.metrics["kl"].item() == 0.0
    # ratio 1 everywhere: the loss is -mean over completion tokens of A
    adv = torch.tensor([1.0, -0.5, 0.0])[:, None].expand(3, 9)
    assert out.loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-6)
    # k3 is >= 0 and matches its formula elsewhere
    ref = logp + torch.randn(3, 9, generator=g)
    d = ref - logp
    torch.testing.assert_close(k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert (k3_kl(logp, ref) >= 0).all()


def _grad_of_ratio(ratio: float, adv: float, eps_low=0.2, eps_high=0.3) -> tuple[float, dict]:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = grpo_loss(logp, torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool), old_logp=torch.zeros(1, 1),
                    eps_low=eps_low, eps_high=eps_high, beta=0.0)
    out.loss.backward()
    return logp.grad.item(), out.metrics


@pytest.mark.parametrize("ratio,adv,clipped", [
    (1.25, 1.0, False), (1.35, 1.0, True),     # upper boundary 1 + eps_high = 1.3, A > 0
    (1.35, -1.0, False),                       # above the boundary with A < 0: never clipped
    (0.85, -1.0, False), (0.75, -1.0, True),   # lower boundary 1 - eps_low = 0.8, A < 0
    (0.75, 1.0, False),                        # below the boundary with A > 0: never clipped
])
def test_clip_behaves_at_the_boundaries(ratio, adv, clipped):
    grad, metrics = _grad_of_ratio(ratio, adv)
    # d/dlogp of -(rho * A) = -rho * A when the ratio term is active, 0 when clipped
    assert grad == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-6)
    assert metrics["clip_fraction"].item() == (1.0 if clipped else 0.0)
    assert metrics["clip_fraction_high" if adv > 0 else "clip_fraction_low"].item() == (1.0 if clipped else 0.0)


def test_loss_matches_plain_per_token_formula_and_global_normaliser():
    g = torch.Generator().manual_seed(1)
    logp, old, ref = (-torch.rand(4, 6, generator=g) * 3 for _ in range(3))
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.7
    out = grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, eps_low=0.2, eps_high=0.28, beta=0.04)
    total, n = 0.0, 0
    for b in range(4):
        for s in range(6):
            if not mask[b, s]:
                continue
            rho = math.exp(logp[b, s] - old[b, s])
            a = adv[b].item()
            d = (ref[b, s] - logp[b, s]).item()
            total += -min(rho * a, min(max(rho, 0.8), 1.28) * a) + 0.04 * (math.exp(d) - d - 1)
            n += 1
    assert out.loss.item() == pytest.approx(total / n, rel=1e-5)
    # chunks with the global normaliser add up to the whole batch's loss
    parts = [grpo_loss(logp[i:i + 2], adv[i:i + 2], mask[i:i + 2], old[i:i + 2], ref[i:i + 2], 0.2, 0.28, 0.04,
                       num_tokens=mask.sum()).loss for i in (0, 2)]
    assert sum(p.item() for p in parts) == pytest.approx(out.loss.item(), rel=1e-5)


# ---------------------------------------------------------------------------------- TP=2 == TP=1
MASK = 255


def _tp_loss_and_grads(model, tp_group):
    from megatron_diffu.rl.coupled import estimate_log_probs

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, MASK, (4, 12), generator=g)
    maskable = torch.zeros(4, 12, dtype=torch.bool)
    maskable[:, 5:] = True
    idx = torch.arange(100, 104)
    completion = maskable.clone()
    completion[0, 10:] = False  # tokens after a first <|im_end|>: noised but no loss
    with torch.no_grad():
        old, _ = estimate_log_probs(model, tokens, maskable, idx, 77, MASK, tp_group=tp_group)
        old = old + 0.3 * torch.randn(old.shape, generator=g)  # a different rollout policy
        ref = old - 0.2 * torch.randn(old.shape, generator=g)
    logp, ent = estimate_log_probs(model, tokens, maskable, idx, 77, MASK, tp_group=tp_group, chunk_size=2,
                                   return_entropy=True)
    out = grpo_loss(logp, torch.tensor([1.0, -0.5, 0.25, 2.0]), completion, old, ref, 0.2, 0.3, 0.05,
                    entropy=ent)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        gr = p.grad
        dim = getattr(p, "tp_shard_dim", None)
        if dim is not None and tp_group is not None:
            parts = [torch.empty_like(gr) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, gr.contiguous(), group=tp_group)
            gr = torch.cat(parts, dim=dim)
        grads[name] = gr.detach().numpy()
    return out.loss.item(), {k: v.item() for k, v in out.metrics.items()}, grads


def _tp_worker(rank):
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer
    from megatron_diffu.parallel.state import ProcessGrid

    cfg = TransformerConfig.from_preset("tiny", seed=9)
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    tp2 = _tp_loss_and_grads(DiffusionTransformer(cfg, grid=grid), grid.tp_group)
    tp1 = _tp_loss_and_grads(DiffusionTransformer(cfg, grid=ProcessGrid.single()), None)
    return tp1, tp2


def test_grpo_loss_and_gradients_tp2_equal_tp1():
    from megatron_diffu.testing import run_distributed

    results = run_distributed(_tp_worker, 2, timeout=240)
    for tp1, tp2 in results:
        assert tp2[0] == pytest.approx(tp1[0], rel=1e-5, abs=1e-6)
        for k in tp1[1]:
            assert tp2[1][k] == pytest.approx(tp1[1][k], rel=1e-4, abs=1e-6), k
        assert tp1[2].keys() == tp2[2].keys()
        for name in tp1[2]:
            torch.testing.assert_close(torch.from_numpy(tp2[2][name]), torch.from_numpy(tp1[2][name]),
                                       rtol=1e-4, atol=1e-6, msg=name)
        assert any(abs(v).max() > 0 for v in tp1[2].values())


def test_chunked_backward_equals_whole_batch_gradients():
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer
    from megatron_diffu.rl.coupled import estimate_log_probs
    from megatron_diffu.rl.loss import chunked_grpo_backward

    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, MASK, (5, 10), generator=g)
    maskable = torch.zeros(5, 10, dtype=torch.bool)
    maskable[:, 4:] = True
    completion = maskable & (torch.rand(5, 10, generator=g) < 0.8)
    idx, adv = torch.arange(5), torch.randn(5, generator=g)
    old = -torch.rand(5, 10, generator=g) * 6
    ref = old + 0.1 * torch.randn(5, 10, generator=g)
    grads, totals = [], []
    for chunk in (5, 2):
        model = DiffusionTransformer(TransformerConfig.from_preset("tiny", seed=1))
        if chunk == 5:  # the whole batch in one graph, written directly
            logp, _ = estimate_log_probs(model, tokens, maskable, idx, 4, MASK)
            out = grpo_loss(logp, adv, completion, old, ref, 0.2, 0.3, 0.1)
            out.loss.backward()
            totals.append(out.loss.item())
        else:
            t = chunked_grpo_backward(model, tokens, maskable, completion, idx, adv, old, ref, mask_seed=4,
                                      mask_id=MASK, chunk_size=chunk, eps_low=0.2, eps_high=0.3, beta=0.1)
            totals.append(t["loss"].item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert totals[1] == pytest.approx(totals[0], rel=1e-5)
    for n in grads[0]:  # fp32 summation order differs: compare relative to the gradient's scale
        scale = grads[0][n].abs().max().item()
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6 * scale, msg=n)
