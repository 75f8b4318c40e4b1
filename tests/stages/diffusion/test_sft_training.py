"""The SFT stage on the real trainer: loss goes down on a small real instruction set, resume
equivalence, TP=2 equals TP=1 for the SFT loss, packed logits equal each conversation alone.

The instruction set is the standard library corpus (`data/sft_corpus.py`) tokenised with the
Qwen tokenizer, then re-indexed onto the ids it actually uses (a dense vocabulary of a few
thousand entries) so that the tiny model's output layer stays cheap on 2 CPU cores.
"""
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_diffu.data.sft import SFTCollator, SFTDataConfig, SFTWriter, parse_record, tokenize_conversation
from megatron_diffu.data.sft_corpus import build_corpus
from megatron_diffu.data.tokenizer import build_tokenizer
from megatron_diffu.diffusion import objective as obj
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.stages.diffusion.config import SFTRunConfig
from megatron_diffu.stages.diffusion.objective import sft_inputs
from megatron_diffu.stages.diffusion.recipes import sft_stage

SEQ = 160


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(prefix, stand-in tokenizer) of 64 stdlib conversations on a dense re-indexed vocabulary."""
    tok = build_tokenizer("HuggingFaceTokenizer")
    convs = [tokenize_conversation(tok, parse_record(r, "corpus")) for r in build_corpus(64)]
    convs = [(ids[:SEQ], mask[:SEQ]) for ids, mask in convs]
    specials = [tok.pad_id, tok.mask_id, tok.im_end_id, tok.im_start_id]
    used = sorted({i for ids, _ in convs for i in ids} | set(specials))
    remap = {old: new for new, old in enumerate(used)}
    prefix = str(tmp_path_factory.mktemp("sft") / "stdlib")
    w = SFTWriter(prefix)
    for ids, mask in convs:
        w.add([remap[i] for i in ids], mask)
    w.commit()
    stand_in = types.SimpleNamespace(pad_id=remap[tok.pad_id], mask_id=remap[tok.mask_id], im_end_id=remap[tok.im_end_id],
                                     eod_id=remap[tok.pad_id], vocab_size=len(used))
    return prefix, stand_in


def make_cfg(prefix, vocab, *overrides):
    v = -(-vocab // 128) * 128
    d = {"model": {"preset": "tiny", "vocab_size": v, "max_position_embeddings": 512, "seed": 7},
         "data": {"data_path": [prefix], "seq_length": SEQ},
         "diffusion": {"random_truncation_prob": 0.0, "eval_mc_samples": 2},
         "sft": {"sft_valid_fraction": 0.125},
         "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 2, "weight_decay": 0.0, "clip_grad": 1.0},
         "training": {"micro_batch_size": 4, "global_batch_size": 8, "train_iters": 30, "eval_interval": 0,
                      "eval_iters": 2, "exit_signal_handler": False},
         "logging": {"log_interval": 1000}}
    for over in overrides:
        for sec, vals in over.items():
            d.setdefault(sec, {}).update(vals)
    return SFTRunConfig.from_dict(d)


def make_trainer(cfg, tok):
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training.trainer import Trainer

    stage = sft_stage(cfg)
    stage.tokenizer, stage.mask_token_id = tok, tok.mask_id
    cfg.diffusion.mask_token_id = tok.mask_id
    return Trainer(cfg, stage, grid=ProcessGrid.single(), device=torch.device("cpu"))


@pytest.mark.slow
def test_sft_loss_and_heldout_elbo_go_down_on_the_stdlib_instruction_set(corpus):
    prefix, tok = corpus
    cfg = make_cfg(prefix, tok.vocab_size, {"training": {"train_iters": 16}, "optimizer": {"lr": 5e-3, "min_lr": 5e-4}})
    trainer = make_trainer(cfg, tok)
    before = trainer.evaluate()["elbo_loss"]
    trainer.train()
    after = trainer.evaluate()["elbo_loss"]
    losses = [h["loss"] for h in trainer.history]
    print("elbo", before, "->", after, "loss", np.mean(losses[:4]), "->", np.mean(losses[-4:]))
    assert after < before - 1.0
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0


def test_throughput_counts_bucketed_positions_not_seq_length(corpus):
    """Conversations of <= 160 tokens with seq_length 320 and buckets [160, 320]: every micro-batch
    is padded to 160, so a step processes 8 x 160 positions (not 8 x 320), and the MFU's mask
    fraction is the response tokens' share, not pretraining's."""
    prefix, tok = corpus
    cfg = make_cfg(prefix, tok.vocab_size, {"data": {"seq_length": 2 * SEQ}, "training": {"train_iters": 1},
                                            "sft": {"sft_length_buckets": [SEQ, 2 * SEQ], "sft_tail_cut_prob": 0.0}})
    trainer = make_trainer(cfg, tok)
    trainer.train()
    (h,) = trainer.history
    assert round(h["tokens_per_s"] * h["step_time"]) == 8 * SEQ
    assert h["mask_fraction"] < 0.5
    # MFU counts the body on those 8 x 160 positions and the output layer on the masked ones only
    flops = cfg.model.step_flops(8 * SEQ, h["mask_fraction"] * 8 * SEQ, 2 * SEQ)
    assert h["mfu"] * h["step_time"] * trainer.peak_flops() == pytest.approx(flops, rel=1e-9)


@pytest.mark.slow
def test_sft_resume_equals_uninterrupted_training(corpus, tmp_path):
    prefix, tok = corpus
    over = {"training": {"train_iters": 4}, "sft": {"sft_tail_cut_prob": 0.5, "sft_length_buckets": [96, 160]}}
    straight = make_trainer(make_cfg(prefix, tok.vocab_size, over), tok)
    straight.train()
    # tokens/s counts the positions really processed: 2 micro-batches of 4, each padded to its bucket
    positions = [round(h["tokens_per_s"] * h["step_time"]) for h in straight.history]
    assert set(positions) <= {4 * a + 4 * b for a in (96, 160) for b in (96, 160)}
    ck = {"checkpoint": {"save": str(tmp_path / "ck"), "load": str(tmp_path / "ck"), "save_interval": 2}}
    first = make_trainer(make_cfg(prefix, tok.vocab_size, over, ck, {"training": {"exit_interval": 2}}), tok)
    first.train()
    assert first.iteration == 2
    # --load + --finetune: the weights only; iteration, optimizer and data position restart
    tuned = make_trainer(make_cfg(prefix, tok.vocab_size, over, {"checkpoint": {"load": str(tmp_path / "ck"),
                                                                                "finetune": True}}), tok)
    assert (tuned.iteration, tuned.consumed_samples) == (0, 0)
    for (n, p), (_, q) in zip(first.model.named_parameters(), tuned.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    resumed = make_trainer(make_cfg(prefix, tok.vocab_size, over, ck), tok)
    assert resumed.iteration == 2 and resumed.consumed_samples == 16
    resumed.train()
    for a, b in zip(straight.history[2:], resumed.history):
        assert a["iteration"] == b["iteration"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------ TP / packing
MASK = 255


def toy_rows():
    g = np.random.default_rng(0)
    out = []
    for n_prompt, n_resp in ((5, 7), (3, 4), (6, 9), (2, 5)):
        ids = g.integers(0, MASK, n_prompt + n_resp)
        out.append((ids, np.r_[np.zeros(n_prompt, bool), np.ones(n_resp, bool)]))
    return out


def _sft_loss_and_grads(model, batch, tp_group):
    inputs = sft_inputs(batch, obj.DiffusionConfig(), seed=3, mask_token_id=MASK, normalization="sequence")
    loss, _ = obj.diffusion_loss(model, inputs, normaliser=4.0, tp_group=tp_group)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        dim = getattr(p, "tp_shard_dim", None)
        if dim is not None and tp_group is not None:
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            g = torch.cat(parts, dim=dim)
        grads[name] = g.numpy()
    return loss.item(), grads


def _tp_worker(rank):
    from megatron_diffu.parallel.state import ProcessGrid

    rows = toy_rows()
    coll = SFTCollator(24, pad_id=0, cfg=SFTDataConfig(sft_pack=True, sft_pack_pad_tokens=0))
    packed = coll([rows[:2], rows[2:]], [10, 11])  # two packed rows (block-diagonal 4-D masks)
    plain = SFTCollator(24, pad_id=0)([[rows[0]], [rows[2]]], [12, 13])
    cfg = TransformerConfig.from_preset("tiny", seed=4)
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    out = {}
    for name, batch in (("packed", packed), ("plain", plain)):
        out[name] = (_sft_loss_and_grads(DiffusionTransformer(cfg, grid=grid), batch, grid.tp_group),
                     _sft_loss_and_grads(DiffusionTransformer(cfg, grid=ProcessGrid.single()), batch, None))
    return out


def test_sft_loss_and_gradients_tp2_equal_tp1():
    from megatron_diffu.testing import run_distributed

    for res in run_distributed(_tp_worker, 2, timeout=240):
        for name, ((l2, g2), (l1, g1)) in res.items():
            assert l2 == pytest.approx(l1, rel=1e-5), name
            for k in g1:
                torch.testing.assert_close(torch.from_numpy(g2[k]), torch.from_numpy(g1[k]), rtol=1e-4, atol=1e-6,
                                           msg=f"{name}: {k}")


def test_packed_logits_equal_each_conversation_alone():
    rows = toy_rows()
    model = DiffusionTransformer(TransformerConfig.from_preset("tiny", seed=2)).eval()
    packed = SFTCollator(40, pad_id=0, cfg=SFTDataConfig(sft_pack=True, sft_pack_pad_tokens=0))([rows[:3]], [0])
    x = packed["tokens"].clone()
    x[packed["maskable"] & (torch.arange(40) % 3 == 0)] = MASK  # some noise, as in training
    with torch.no_grad():
        logits = model(x, attention_mask=packed["attention_mask"], position_ids=packed["position_ids"])[0]
        start = 0
        for ids, _ in rows[:3]:
            n = len(ids)
            alone = model(x[:, start:start + n])[0]
            # position 0 of a conversation is never predicted (shift: its logit row copies hidden 0 /
            # the previous conversation's last); every other position must match exactly
            torch.testing.assert_close(logits[start + 1:start + n], alone[1:], rtol=1e-5, atol=1e-5)
            start += n


def _dp_worker(rank, prefix, tok_fields):
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training.trainer import Trainer

    tok = types.SimpleNamespace(**tok_fields)
    out = {}
    for name, grid in (("dp2", ProcessGrid.build(1, 1)), ("dp1", ProcessGrid.single())):
        cfg = make_cfg(prefix, tok.vocab_size, {"training": {"train_iters": 3, "micro_batch_size": 2},
                                                "sft": {"sft_loss_normalization": "sequence",
                                                        "sft_length_buckets": [96, 160]}})
        stage = sft_stage(cfg)
        stage.tokenizer, stage.mask_token_id = tok, tok.mask_id
        cfg.diffusion.mask_token_id = tok.mask_id
        trainer = Trainer(cfg, stage, grid=grid, device=torch.device("cpu"))
        trainer.train()
        out[name] = ([(h["loss"], h["grad_norm"]) for h in trainer.history],
                     {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()})
    return out


@pytest.mark.slow
def test_sft_data_parallel_2_equals_1(corpus):
    """DP=2 ranks see exactly the global batch of DP=1 and the all-reduced normaliser makes the
    loss and the update identical (here with per-sequence normalisation and buckets)."""
    from megatron_diffu.testing import run_distributed

    prefix, tok = corpus
    for res in run_distributed(_dp_worker, 2, args=(prefix, vars(tok)), timeout=300):
        (l2, w2), (l1, w1) = res["dp2"], res["dp1"]
        assert np.allclose(l2, l1, rtol=1e-5), (l2, l1)  # loss and gradient norm of every step
        for k in w1:  # Adam turns fp32 reduction-order noise into ~1e-6 drifts; updates are ~1e-2
            assert np.abs(w2[k] - w1[k]).max() < 1e-4, k
