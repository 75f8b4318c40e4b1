"""SFT against Dream's SFT loss, written out plainly (docs/ALGORITHMS.md sec. 3.3): each masked
response token's cross-entropy weighted by 1/t, the micro-batch's sum divided by its number of
masked tokens, and the step's loss the mean of those micro-batch losses
(`sft_loss_normalization: masked`, with the default `loss_weighting: inverse_t`)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_sft_training import corpus, make_cfg, make_trainer  # noqa: E402,F401


@torch.no_grad()
def test_masked_normalisation_is_the_mean_of_micro_batch_masked_means(corpus, one_thread):
    prefix, tok = corpus
    cfg = make_cfg(prefix, tok.vocab_size, {"sft": {"sft_loss_normalization": "masked"}})
    trainer = make_trainer(cfg, tok)
    trainer.iteration = 1
    stage = trainer.stage
    assert stage.normaliser.name == "masked"
    batches = stage.step_inputs(trainer).micro_batches
    assert len(batches) > 1
    got, means = 0.0, []
    for b in batches:
        out, loss_fn = stage.forward_step(trainer.model, b, None)
        got += float(loss_fn(out)[0])
        inp = stage.masking.noise(b, trainer, stage.mask_token_id, stage.special_ids)
        logits = trainer.model(inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids)
        ce = F.cross_entropy(logits[inp.logit_positions].float(), inp.targets, reduction="none")
        inv_t = 1.0 / inp.t[inp.logit_positions.nonzero()[:, 0]]
        means.append(float((ce * inv_t).sum()) / int(inp.logit_positions.sum()))
    assert got == pytest.approx(sum(means) / len(means), rel=1e-4)


def test_masked_is_accepted_and_unknown_rejected():
    from megatron_diffu.data.sft import SFTDataConfig

    assert SFTDataConfig(sft_loss_normalization="masked").problems() == []
    assert SFTDataConfig(sft_loss_normalization="nope").problems()


# ------------------------------------------------------------------------------------ packing
# Dream's SFT does not pack: every row is one conversation followed by pad tokens that are in the
# loss (the model learns to stop). Packed rows here follow that: each conversation is followed by
# `sft_pack_pad_tokens` pad tokens of its own, maskable, attending within that conversation.
PAD = 9


def _conv(n_prompt, n_resp, base=100):
    import numpy as np

    ids = np.arange(base, base + n_prompt + n_resp, dtype=np.int64)
    return ids, np.r_[np.zeros(n_prompt, bool), np.ones(n_resp, bool)]


def test_packed_conversations_are_each_followed_by_maskable_padding():
    from megatron_diffu.data.sft import SFTCollator, SFTDataConfig

    cfg = SFTDataConfig(sft_pack=True, sft_pack_pad_tokens=2)
    b = SFTCollator(14, PAD, cfg)([[_conv(2, 3), _conv(1, 3, 200)]], [0])
    # conversation 0: 5 tokens + 2 pads; conversation 1: 4 tokens + 2 pads; 1 fill position
    assert b["tokens"][0].tolist() == [100, 101, 102, 103, 104, PAD, PAD, 200, 201, 202, 203, PAD, PAD, PAD]
    assert b["segment_ids"][0].tolist() == [0] * 7 + [1] * 6 + [2]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 0]
    assert b["maskable"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]
    assert b["response_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]  # pads: not response
    m = b["attention_mask"][0, 0]
    assert m[:7, :7].all() and m[7:13, 7:13].all() and not m[:7, 7:].any() and not m[13, :13].any()
    # the earlier layout, kept as sft_pack_pad_tokens: 0
    old = SFTCollator(14, PAD, SFTDataConfig(sft_pack=True, sft_pack_pad_tokens=0))([[_conv(2, 3), _conv(1, 3, 200)]], [0])
    assert old["maskable"][0].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 1] + [0] * 5


def test_each_packed_conversation_is_an_unpacked_row_of_its_length_plus_its_padding():
    """Segment k of a packed row == conversation k alone, unpacked, padded to len + N: same tokens,
    maskable positions, positions, and (as attention stays in the segment) the same logits."""
    from megatron_diffu.data.sft import SFTCollator, SFTDataConfig
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer

    convs, N = [_conv(3, 4), _conv(2, 6, 150), _conv(4, 2, 200)], 3
    packed = SFTCollator(40, PAD, SFTDataConfig(sft_pack=True, sft_pack_pad_tokens=N))([convs], [0])
    model = DiffusionTransformer(TransformerConfig.from_preset("tiny", seed=3)).eval()
    with torch.no_grad():
        logits = model(packed["tokens"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"])[0]
        start = 0
        for ids, _ in convs:
            n = len(ids) + N
            alone = SFTCollator(n, PAD)([[(ids, _)]], [0])
            seg = slice(start, start + n)
            assert torch.equal(packed["tokens"][0, seg], alone["tokens"][0])
            assert torch.equal(packed["maskable"][0, seg], alone["maskable"][0])
            assert torch.equal(packed["position_ids"][0, seg], torch.arange(n))
            ref = model(alone["tokens"])[0]
            torch.testing.assert_close(logits[start + 1:start + n], ref[1:], rtol=1e-5, atol=1e-5)  # 0: the shift
            start += n


def test_the_pack_plan_reserves_each_conversations_padding():
    import numpy as np

    from megatron_diffu.data.sft import SFTDataConfig, SFTDataset

    class Convs:
        lengths = np.array([5, 4, 6, 3, 9, 2, 7])

        def __len__(self):
            return len(self.lengths)

        def conv(self, i):
            return _conv(1, int(self.lengths[i]) - 1, base=10 * i)

    ds = SFTDataset(Convs(), 16, seed=1, pack=True, pack_pad_tokens=3)
    assert sorted(i for r in ds.rows for i in r) == list(range(7))
    for r in ds.rows:
        assert len(r) == 1 or sum(int(Convs.lengths[i]) + 3 for i in r) <= 16
    assert SFTDataConfig().sft_pack_pad_tokens == 64
    assert any("sft_pack_pad_tokens" in e for e in SFTDataConfig(sft_pack_pad_tokens=-1).problems())


def test_the_stage_packs_with_the_configured_padding(corpus):
    prefix, tok = corpus
    cfg = make_cfg(prefix, tok.vocab_size, {"sft": {"sft_pack": True, "sft_pack_pad_tokens": 8}})
    trainer = make_trainer(cfg, tok)
    data = trainer.stage.data
    lengths = data.train_set.convs.lengths
    assert any(len(r) > 1 for r in data.train_set.rows)
    for r in data.train_set.rows:
        assert len(r) == 1 or sum(int(lengths[i]) + 8 for i in r) <= cfg.data.seq_length
    b = data.micro_batches(trainer)[0]
    pads = b["maskable"] & ~b["response_mask"]
    assert pads.any() and (b["tokens"][pads] == tok.pad_id).all()
