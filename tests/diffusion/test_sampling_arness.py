"""AR-ness on hand-made decoding orders, checked against values worked out by hand."""
from __future__ import annotations

import os

import pytest
import torch

from megatron_diffu.diffusion.arness import (arness, decoding_order, global_arness, local_arness,
                                             order_heatmap_png, order_heatmap_text)


def test_left_to_right_is_fully_autoregressive():
    order = list(range(12))
    for k in range(1, 6):
        assert local_arness(order, k) == 1.0
        assert global_arness(order, k) == 1.0
    assert arness(torch.arange(12)) == {f"{kind}@{k}": 1.0 for k in (1, 2, 3, 4) for kind in ("local", "global")}


def test_right_to_left():
    order = list(range(7, -1, -1))  # 8 tokens, last first
    # local: no step extends a run to the right (the first step at 7 does not follow the prompt)
    assert local_arness(order, 1) == 0.0
    # global@1: only the final step (position 0, the only mask left) is the earliest mask
    assert global_arness(order, 1) == pytest.approx(1 / 8)
    # global@2: the last two steps (positions 1 and 0 with masks {0,1} then {0})
    assert global_arness(order, 2) == pytest.approx(2 / 8)


def test_hand_worked_order():
    # new positions 0..5 decoded in the order 1, 0, 2, 3, 5, 4
    order = [1, 0, 2, 3, 5, 4]
    # local@1 asks p_{t-1} == p_t - 1:  t1: prompt(-1) vs 0 no; t2: 1 vs -1 no; t3: 0 vs 1 no;
    #           t4: 2 vs 2 yes; t5: 3 vs 4 no; t6: 5 vs 3 no  -> 1/6
    assert local_arness(order, 1) == pytest.approx(1 / 6)
    # local@2 needs p_{t-1}=p_t-1 and p_{t-2}=p_t-2: t4: (2, 0) vs (2, 1) no -> 0
    assert local_arness(order, 2) == 0.0
    # global@1: masks before each step: {0..5}->1 no; {0,2..5}->0 yes; {2..5}->2 yes; {3,4,5}->3 yes;
    #           {4,5}->5 no; {4}->4 yes  -> 4/6
    assert global_arness(order, 1) == pytest.approx(4 / 6)
    # global@2: step 1 picks 1 (2nd earliest) yes; step 5 picks 5 of {4,5} yes -> 6/6
    assert global_arness(order, 2) == 1.0


def test_prompt_counts_as_decoded_prefix():
    # starting right after the prompt with a 3-run: local@3 counts the prompt as the run's left part
    assert local_arness([0, 1, 2], 3) == 1.0
    assert local_arness([1, 0, 2], 1) == 0.0  # position 1 first does not follow the prompt


def test_reveal_steps_linearise_left_to_right_and_skip_unrevealed():
    reveal = torch.tensor([1, 0, 0, 2, -1, 1])
    assert decoding_order(reveal) == [1, 2, 0, 5, 3]
    batch = torch.stack([torch.arange(5), torch.tensor([4, 3, 2, 1, 0])])
    r = arness(batch, ks=(1,))
    assert r["local@1"] == pytest.approx((1.0 + 0.0) / 2)
    assert r["global@1"] == pytest.approx((1.0 + 0.2) / 2)


def test_monotone_in_k():
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(40, generator=g).tolist()
    loc = [local_arness(order, k) for k in range(1, 8)]
    glo = [global_arness(order, k) for k in range(1, 8)]
    assert loc == sorted(loc, reverse=True) and glo == sorted(glo)


def test_heatmaps(tmp_path):
    tokens = ["def", " f", "(", "x", "):", "\n", "  return", " x"]
    steps = [0, 1, 2, 3, 7, 6, 5, 4]
    plain = order_heatmap_text(tokens, steps, color=False)
    lines = plain.splitlines()
    assert "def f(x):" in lines[1] and lines[2].startswith("   ")  # step 0 -> lightest ramp char
    assert lines[2][lines[1].index("):")] == "@"  # step 7 -> densest
    colored = order_heatmap_text(tokens, steps, color=True)
    assert "\x1b[48;2;0;60;255m" in colored  # step 0 is pure blue
    path = order_heatmap_png(str(tmp_path / "order.png"), steps, tokens, columns=4)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["order.png"]  # no temp file left behind


def test_sampler_order_feeds_arness_end_to_end():
    """A logits hook that makes the leftmost (or rightmost) mask the only confident one drives the
    real sampler strictly left to right (right to left); its reveal steps score 1.0 (0.0)."""
    from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
    from test_sampling_reference import MASK, PAD, PROMPTS, tiny_model

    model = tiny_model()

    def make_hook(pick_last: bool):
        def hook(step, x, logits):
            logits = torch.zeros_like(logits)
            off = x.shape[1] - logits.shape[1]
            for b in range(x.shape[0]):
                masked = (x[b, off:] == MASK).nonzero().squeeze(-1)
                if masked.numel():
                    logits[b, masked[-1 if pick_last else 0], 7] = 30.0  # one confident position per row
            return logits
        return hook

    cfg = SamplingConfig(max_new_tokens=8, steps=8, alg="maskgit_plus", threshold=2.0)
    l2r = diffusion_generate(model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD, logits_hook=make_hook(False))
    assert l2r.reveal_step.tolist() == [list(range(8))] * 3
    assert arness(l2r.reveal_step, ks=(1, 3))["local@3"] == 1.0
    r2l = diffusion_generate(model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD, logits_hook=make_hook(True))
    scores = arness(r2l.reveal_step, ks=(1,))
    assert scores["local@1"] == 0.0 and scores["global@1"] == pytest.approx(1 / 8)
