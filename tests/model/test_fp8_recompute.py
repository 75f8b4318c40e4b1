"""Full activation recompute with torch-native FP8 (`fp8.recompute_contexts`): the recomputation in
the backward reuses the scales of the forward, as Transformer Engine's checkpoint does with its FP8
metadata. Reference: the same steps without recompute, which must give the same gradients and the
same amax histories and scales (one entry per step). The control case shows what plain
torch.utils.checkpoint does instead: every step enters each forward amax twice."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_diffu.model import fp8
from megatron_diffu.model import transformer as transformer_module
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer

HISTORY = 8
STEPS = 3


def _model(recompute: bool) -> DiffusionTransformer:
    cfg = TransformerConfig.from_preset("tiny", hidden_size=64, ffn_hidden_size=128,
                                        recompute_granularity="full" if recompute else None)
    model = DiffusionTransformer(cfg)
    assert fp8.enable_fp8(model, fp8.Fp8Recipe("hybrid", amax_history_len=HISTORY)) == 8
    return model.train()


def _states(model) -> dict:
    return {n: m.fp8 for n, m in model.named_modules() if getattr(m, "fp8", None) is not None}


def _train(model) -> list:
    """STEPS SGD steps with a large rate, so the weights' and activations' amaxes change every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(ids).view(-1, 256), ids.view(-1)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def test_recompute_reuses_the_forward_scales(one_thread):
    plain, recomputed = _model(False), _model(True)
    grads_plain, grads_recomputed = _train(plain), _train(recomputed)
    for step, (a, b) in enumerate(zip(grads_plain, grads_recomputed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {step}: gradients differ"
    states_plain, states_recomputed = _states(plain), _states(recomputed)
    assert states_plain.keys() == states_recomputed.keys() and len(states_plain) == 8
    for name, st in states_recomputed.items():
        for role in ("input", "weight", "grad"):
            a, b = getattr(states_plain[name], role), getattr(st, role)
            assert int((a.history > 0).sum()) == STEPS  # one amax per step
            assert torch.equal(a.history, b.history) and torch.equal(a.scale, b.scale), (name, role)
            assert not b.replay  # every queued scale was taken back by its recomputation


def test_control_plain_checkpoint_records_forward_amaxes_twice(one_thread, monkeypatch):
    monkeypatch.setattr(transformer_module, "recompute_contexts",
                        lambda: (contextlib.nullcontext(), contextlib.nullcontext()))
    model = _model(True)
    _train(model)
    for st in _states(model).values():
        assert int((st.input.history > 0).sum()) == 2 * STEPS  # forward + recomputation
        assert int((st.grad.history > 0).sum()) == STEPS


def test_replay_without_a_recorded_forward_fails_closed():
    st = fp8.ScalingState(4, fp8.E4M3)
    record, replay = fp8.recompute_contexts()
    with record:
        s = st.update(torch.tensor([2.0]))
    with replay:
        assert st.update(torch.tensor([5.0])) is s  # the forward's scale, 5.0 not recorded
        with pytest.raises(RuntimeError, match="no scale recorded"):
            st.update(torch.tensor([5.0]))
    assert int((st.history > 0).sum()) == 1
