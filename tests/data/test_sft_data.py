"""SFT data: ChatML response masks, the indexed-dataset round trip, batching, masking, packing."""
import json
import os

import numpy as np
import pytest
import torch

from megatron_diffu.data.sft import (BadRecord, SFTCollator, SFTConversations, SFTDataConfig, SFTDataset,
                                     pack_plan, sft_paths, tokenize_conversation)
from megatron_diffu.data.sft_preprocess import preprocess_sft
from megatron_diffu.data.tokenizer import build_tokenizer
from megatron_diffu.diffusion.objective import DiffusionConfig
from megatron_diffu.stages.diffusion.objective import sft_inputs

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Square a number."},
    {"role": "assistant", "content": "def sq(x):\n    return x * x"},
    {"role": "user", "content": "Now cube it."},
    {"role": "assistant", "content": "def cube(x):\n    return x ** 3"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("HuggingFaceTokenizer")


def spans(mask):
    """[(start, end)] of the runs of 1s."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_multi_turn_masks_on_a_hand_written_conversation(tok):
    ids, mask = tokenize_conversation(tok, CONVERSATION, verify=True)
    # the ids are exactly ChatML, written out by hand, without the "\n" after the last <|im_end|>
    text = ("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nSquare a number.<|im_end|>\n"
            "<|im_start|>assistant\ndef sq(x):\n    return x * x<|im_end|>\n"
            "<|im_start|>user\nNow cube it.<|im_end|>\n<|im_start|>assistant\ndef cube(x):\n    return x ** 3<|im_end|>")
    assert tok.decode(ids) == text
    # exactly the two assistant turns (content + <|im_end|>) are response
    runs = spans(mask)
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["def sq(x):\n    return x * x<|im_end|>",
                                                       "def cube(x):\n    return x ** 3<|im_end|>"]
    assert ids[-1] == tok.im_end_id and mask[-1] == 1
    # everything before each response is the prompt the model is conditioned on
    assert tok.decode(ids[:runs[0][0]]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[runs[0][1]:runs[1][0]]) == "\n<|im_start|>user\nNow cube it.<|im_end|>\n<|im_start|>assistant\n"


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def test_preprocess_round_trip_read_by_megatron_core(tok, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "chat.jsonl"
    recs = [{"messages": CONVERSATION}, {"prompt": "Say hi.", "response": "hi"},
            {"prompt": "p", "response": "r", "system": "s"}]
    write_jsonl(src, recs)
    stats = preprocess_sft([str(src)], str(tmp_path / "out"), log_interval_s=0)
    assert stats.documents == 3
    tok_p, msk_p = sft_paths(str(tmp_path / "out"))
    ids_ds, mask_ds = IndexedDataset(tok_p), IndexedDataset(msk_p)
    assert len(ids_ds) == len(mask_ds) == 3
    assert mask_ds[0].dtype == np.uint8
    expected = [tokenize_conversation(tok, CONVERSATION),
                tokenize_conversation(tok, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
                tokenize_conversation(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                                            {"role": "assistant", "content": "r"}])]
    for i, (ids, mask) in enumerate(expected):
        assert ids_ds[i].tolist() == ids and mask_ds[i].tolist() == mask
    convs = SFTConversations(str(tmp_path / "out"))
    assert convs.lengths.tolist() == [len(e[0]) for e in expected]
    from megatron_diffu.data.sft import ConcatConversations
    both = ConcatConversations([str(tmp_path / "out"), str(tmp_path / "out")])
    assert len(both) == 6 and both.conv(4)[0].tolist() == expected[1][0] and both.conv(2)[1].tolist() == expected[2][1]


def test_bad_input_names_file_and_line_and_skip_bad(tmp_path):
    src = tmp_path / "bad.jsonl"
    write_jsonl(src, [{"prompt": "a", "response": "b"}], raw_lines=[
        '{"prompt": "a", "response": ',                                    # line 2: invalid JSON
        '{"messages": [{"role": "user", "content": "no answer"}]}',       # line 3: no assistant turn
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',  # line 4
        '{"text": "pretraining record"}'])                                # line 5
    out = str(tmp_path / "o")
    with pytest.raises(BadRecord, match=r"bad\.jsonl:2: invalid JSON.*--skip-bad"):
        preprocess_sft([str(src)], out, log_interval_s=0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o_")]  # nothing half-written left
    stats = preprocess_sft([str(src)], out, skip_bad=True, log_interval_s=0)
    assert (stats.documents, stats.skipped) == (1, 4)
    assert len(SFTConversations(out)) == 1
    from megatron_diffu.data.sft import parse_record
    with pytest.raises(BadRecord, match="x.jsonl:3: the conversation must end with an assistant turn"):
        parse_record({"messages": [{"role": "user", "content": "q"}]}, "x.jsonl:3")
    with pytest.raises(BadRecord, match=r"x.jsonl:4: messages\[0\].role='robot'"):
        parse_record({"messages": [{"role": "robot", "content": "q"}]}, "x.jsonl:4")


# ------------------------------------------------------------------------------------ batches
PAD = 9


def conv(n_prompt, n_resp, base=100):
    ids = np.arange(base, base + n_prompt + n_resp, dtype=np.int64)
    mask = np.r_[np.zeros(n_prompt, bool), np.ones(n_resp, bool)]
    return ids, mask


def test_padding_after_the_response_is_maskable_and_counted():
    rows = [[conv(4, 3)], [conv(2, 6)]]
    b = SFTCollator(12, PAD)(rows, [5, 6])
    assert b["tokens"].shape == (2, 12)
    assert (b["tokens"][0, 7:] == PAD).all() and (b["tokens"][1, 8:] == PAD).all()
    assert b["maskable"][0].tolist() == [0] * 4 + [1] * 8
    assert b["maskable"][1].tolist() == [0] * 2 + [1] * 10
    assert b["response_mask"][0].sum() == 3 and "attention_mask" not in b
    assert b["sample_index"].tolist() == [5, 6]


def test_buckets_cutoff_and_tail_cut():
    rows = [[conv(4, 3)], [conv(2, 6)]]
    bucketed = SFTCollator(64, PAD, SFTDataConfig(sft_length_buckets=[8, 16, 32]))(rows, [0, 1])
    assert bucketed["tokens"].shape == (2, 8)  # longest row 8 -> bucket 8
    cut = SFTCollator(12, PAD, SFTDataConfig(sft_response_cutoff=True))(rows, [0, 1])
    assert cut["tokens"].shape == (2, 12)
    assert cut["maskable"][:, 8:].sum() == 0 and cut["attention_mask"][:, 8:].sum() == 0
    assert cut["maskable"][0].tolist() == [0] * 4 + [1] * 4 + [0] * 4  # padding up to the longest row counts
    cfg = SFTDataConfig(sft_tail_cut_prob=1.0)
    lengths = set()
    for key in range(20):
        b = SFTCollator(40, PAD, cfg, seed=3)(rows, [key, key + 1])
        keep = int(b["attention_mask"][0].sum()) if "attention_mask" in b else 40
        assert 8 <= keep <= 40 and b["maskable"][:, keep:].sum() == 0
        again = SFTCollator(40, PAD, cfg, seed=3)(rows, [key, key + 1])
        assert torch.equal(b["maskable"], again["maskable"])  # keyed, reproducible
        lengths.add(keep)
    assert len(lengths) > 5


def test_cut_lengths_round_up_to_the_multiple_with_the_same_cut():
    """Bucketed + tail cut: the multiple changes only how many (unattended, unmaskable) pad positions
    are materialised, never the cut itself (same keyed draw) nor the tokens, masks or loss positions
    before it."""
    rows = [[conv(4, 3)], [conv(2, 6)]]
    exact_cfg = SFTDataConfig(sft_length_buckets=[40], sft_tail_cut_prob=1.0, sft_cut_length_multiple=1)
    round_cfg = SFTDataConfig(sft_length_buckets=[40], sft_tail_cut_prob=1.0, sft_cut_length_multiple=16)
    shapes_exact, shapes_round = set(), set()
    for key in range(30):
        exact = SFTCollator(40, PAD, exact_cfg, seed=3)(rows, [key, key + 1])
        rounded = SFTCollator(40, PAD, round_cfg, seed=3)(rows, [key, key + 1])
        n = exact["tokens"].shape[1]
        m = rounded["tokens"].shape[1]
        assert m == min(40, -(-n // 16) * 16)
        assert torch.equal(rounded["tokens"][:, :n], exact["tokens"])
        assert torch.equal(rounded["maskable"][:, :n], exact["maskable"]) and rounded["maskable"][:, n:].sum() == 0
        attended = rounded.get("attention_mask", torch.ones(2, m, dtype=torch.bool))
        assert attended[:, :n].all() and not attended[:, n:].any()
        shapes_exact.add(n)
        shapes_round.add(m)
    assert len(shapes_exact) > 5 and shapes_round <= {16, 32, 40}
    assert SFTDataConfig(sft_cut_length_multiple=0).problems()  # fail closed on a useless value


def test_pack_plan_and_packed_batch_layout():
    lengths = np.array([5, 4, 6, 3, 9])
    rows = pack_plan(lengths, np.arange(5), 10)
    assert rows == [[0, 1], [2, 3], [4]]
    b = SFTCollator(10, PAD, SFTDataConfig(sft_pack=True, sft_pack_pad_tokens=0))([[conv(2, 3), conv(1, 3, 200)]], [0])
    assert b["segment_ids"][0].tolist() == [0] * 5 + [1] * 4 + [2]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert b["maskable"][0].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 1, 0]  # fill padding: not maskable
    m = b["attention_mask"][0, 0]
    assert m.shape == (10, 10) and m[:5, :5].all() and m[5:9, 5:9].all()
    assert not m[:5, 5:].any() and not m[5:, :5].any() and m[9, 9] and not m[9, :9].any()


def test_dataset_rows_depend_only_on_seed_and_index(tmp_path):
    class Convs:
        lengths = np.array([3, 4, 5, 6, 7, 3])

        def __len__(self):
            return 6

        def conv(self, i):
            return conv(1, int(self.lengths[i]) - 1, base=10 * i)

    a, b = SFTDataset(Convs(), 8, seed=1), SFTDataset(Convs(), 8, seed=1)
    first = [a.row(i)[0][0][0] for i in range(12)]
    assert first == [b.row(i)[0][0][0] for i in range(12)]
    assert sorted(first[:6]) == sorted(first[6:]) == [0, 10, 20, 30, 40, 50]  # each epoch a permutation
    assert first[:6] != first[6:]  # reshuffled per epoch
    packed = SFTDataset(Convs(), 8, seed=1, pack=True)
    assert sorted(i for r in packed.rows for i in r) == list(range(6))


# ------------------------------------------------------------------------------------ masking
def test_prompt_never_masked_and_masking_rate_matches_t():
    rows = [[conv(6, 10)], [conv(3, 20)], [conv(9, 5)], [conv(1, 30)]]
    coll = SFTCollator(48, PAD)
    cfg = DiffusionConfig()
    masked_total, expected_total = 0.0, 0.0
    ts, fracs = [], []
    for step in range(150):
        idx = [4 * step + k for k in range(4)]
        b = coll(rows, idx)
        inp = sft_inputs(b, cfg, seed=17, mask_token_id=255)
        masked = inp.logit_positions
        assert not (masked & ~b["maskable"]).any()  # the prompt is never masked
        assert (inp.input_ids[~masked] == b["tokens"][~masked]).all() and (inp.input_ids[masked] == 255).all()
        torch.testing.assert_close(inp.weights, (1.0 / inp.t)[masked.nonzero()[:, 0]])
        n = b["maskable"].sum(1).float()
        masked_total += masked.sum().item()
        expected_total += (inp.t * n).sum().item()
        ts.append(inp.t)
        fracs.append(masked.sum(1).float() / n)
    # overall rate: sum masked = sum t * n within 3 binomial standard deviations (+ forced masks)
    assert abs(masked_total - expected_total) < 3 * np.sqrt(expected_total) + 20
    t, f = torch.cat(ts), torch.cat(fracs)
    assert ((t > 1e-3) & (t < 1)).all() and t.min() < 0.05 and t.max() > 0.95
    slope = ((t - t.mean()) * (f - f.mean())).sum() / ((t - t.mean()) ** 2).sum()
    assert abs(slope.item() - 1.0) < 0.1  # per-row masked fraction tracks t


def test_sequence_normalisation_divides_by_each_sequence_count():
    rows = [[conv(2, 3)], [conv(2, 10)]]
    b = SFTCollator(16, PAD)(rows, [0, 1])
    tok_in = sft_inputs(b, DiffusionConfig(), seed=1, mask_token_id=255)
    seq_in = sft_inputs(b, DiffusionConfig(), seed=1, mask_token_id=255, normalization="sequence")
    rows_of = tok_in.logit_positions.nonzero()[:, 0]
    counts = b["maskable"].sum(1).float()
    torch.testing.assert_close(seq_in.weights, tok_in.weights / counts[rows_of])
