"""Packed/blended pretraining samples and the data-parallel loader, on real (stdlib) data."""
import os
import sysconfig
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_diffu.data.config import DataConfig, parse_blend, parse_split
from megatron_diffu.data.datasets import build_pretrain_datasets
from megatron_diffu.data.indexed import DatasetFormatError
from megatron_diffu.data.loader import PretrainingSampler, build_pretrain_data_iterators, collate_pretrain
from megatron_diffu.data.preprocess import PreprocessConfig, run_preprocess
from megatron_diffu.data.tokenizer import build_tokenizer
from megatron_diffu.testing import run_distributed

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Two real datasets: A = stdlib json/ (~16k tokens), B = stdlib email/mime/ (~5k tokens)."""
    root = tmp_path_factory.mktemp("samples")
    out = []
    for name, src in (("a", "json"), ("b", "email/mime")):
        cfg = PreprocessConfig(input=[os.path.join(STDLIB, src)], output_prefix=str(root / name),
                               extensions=[".py"], append_eod=True, skip_bad=True, log_interval=0)
        out.append(run_preprocess(cfg).outputs["text"])
    return out


def _cfg(data_path, tmp_path, **kw):
    kw.setdefault("split", "100,0,0")
    kw.setdefault("seq_length", 16)
    return DataConfig(data_path=list(data_path), data_cache_path=str(tmp_path / "cache"), **kw)


def test_samples_are_packed_windows_of_the_shuffled_documents(prefixes, qwen, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    S = 32
    train = build_pretrain_datasets(_cfg(prefixes[:1], tmp_path, seq_length=S), qwen, train_samples=1)["train"]
    docs = IndexedDataset(prefixes[0])
    # reference: concatenate the documents in the dataset's (seeded) document order, cut S-token windows
    order = np.asarray(train.dataset.document_index)
    assert sorted(order.tolist()) == list(range(len(docs)))  # one epoch: every document exactly once
    stream = np.concatenate([docs[int(d)] for d in order]).astype(np.int64)
    windows = Counter(tuple(stream[k * S:(k + 1) * S]) for k in range(len(stream) // S))
    got = Counter(tuple(train[i]["tokens"]) for i in range(len(train)))
    assert len(train) == len(stream) // S  # exactly seq_length tokens each, no overlap, partial tail dropped
    assert got == windows  # the same windows, each as often (a permutation of the packed stream)
    assert [train[i]["sample_index"] for i in range(3)] == [0, 1, 2]


def test_blend_proportions_within_one_percent(prefixes, qwen, tmp_path):
    cfg = _cfg(["0.7", prefixes[0], "0.3", prefixes[1]], tmp_path, seed=7)
    train = build_pretrain_datasets(cfg, qwen, train_samples=10_000)["train"]
    ids = np.array([train[i]["dataset_id"] for i in range(10_000)])
    assert abs((ids == 0).mean() - 0.7) < 0.01 and abs((ids == 1).mean() - 0.3) < 0.01
    # and at every prefix, not only on average (Megatron's greedy blending keeps the error below 1 sample)
    for n in (100, 1000, 5000):
        assert abs((ids[:n] == 1).sum() - 0.3 * n) <= 1


def test_same_seed_same_samples_and_cache_reuse(prefixes, qwen, tmp_path):
    blend = ["0.6", prefixes[0], "0.4", prefixes[1]]
    first = build_pretrain_datasets(_cfg(blend, tmp_path / "x", seed=3), qwen, 2000)["train"]
    again = build_pretrain_datasets(_cfg(blend, tmp_path / "y", seed=3), qwen, 2000)["train"]  # fresh build
    cached = build_pretrain_datasets(_cfg(blend, tmp_path / "x", seed=3), qwen, 2000)["train"]  # cache hit
    other = build_pretrain_datasets(_cfg(blend, tmp_path / "z", seed=4), qwen, 2000)["train"]
    a = np.stack([first[i]["tokens"] for i in range(2000)])
    assert np.array_equal(a, np.stack([again[i]["tokens"] for i in range(2000)]))
    assert np.array_equal(a, np.stack([cached[i]["tokens"] for i in range(2000)]))
    assert not np.array_equal(a, np.stack([other[i]["tokens"] for i in range(2000)]))
    assert any(f.endswith(".npy") for f in os.listdir(tmp_path / "x" / "cache"))


def _batches(cfg, tok, dp_rank, dp_size, mbs, gbs, train_samples, consumed, n):
    it, _, _ = build_pretrain_data_iterators(cfg, tok, dp_rank, dp_size, mbs, gbs, train_samples, consumed)
    return [next(it) for _ in range(n)]


def test_resume_continues_the_same_sequence(prefixes, qwen, tmp_path):
    cfg = _cfg(["0.5", prefixes[0], "0.5", prefixes[1]], tmp_path)
    full = _batches(cfg, qwen, 0, 1, 2, 4, 400, 0, 12)
    resumed = _batches(cfg, qwen, 0, 1, 2, 4, 400, 8, 8)  # after 2 steps of global batch 4 = 4 micro-batches
    for x, y in zip(full[4:], resumed):
        assert torch.equal(x["sample_index"], y["sample_index"]) and torch.equal(x["tokens"], y["tokens"])
    with pytest.raises(ValueError, match="multiple of global_batch_size"):
        _batches(cfg, qwen, 0, 1, 2, 4, 400, 6, 1)


def test_dp2_ranks_together_see_the_dp1_global_batches(prefixes, qwen, tmp_path):
    cfg = _cfg(["0.5", prefixes[0], "0.5", prefixes[1]], tmp_path)
    gbs, steps = 8, 3
    dp1 = _batches(cfg, qwen, 0, 1, 2, gbs, 200, 0, steps * gbs // 2)
    ranks = [_batches(cfg, qwen, r, 2, 2, gbs, 200, 0, steps * gbs // 4) for r in range(2)]
    _assert_same_global_batches(dp1, ranks, gbs)


def _assert_same_global_batches(dp1, ranks, gbs):
    def by_step(batches, per_step):
        steps = [batches[i:i + per_step] for i in range(0, len(batches), per_step)]
        return [{int(s): t for b in step for s, t in zip(b["sample_index"], b["tokens"])} for step in steps]

    ref = by_step(dp1, gbs // 2)
    per_rank = [by_step(b, gbs // 4) for b in ranks]
    for step, want in enumerate(ref):
        got0, got1 = per_rank[0][step], per_rank[1][step]
        assert not set(got0) & set(got1)  # no sample on both ranks
        merged = {**got0, **got1}
        assert sorted(merged) == sorted(want) == list(range(step * gbs, (step + 1) * gbs))
        assert all(torch.equal(merged[k], want[k]) for k in want)


def _dp_worker(rank, prefixes, cache, gbs, n):
    tok = build_tokenizer()
    cfg = DataConfig(data_path=["0.5", prefixes[0], "0.5", prefixes[1]], split="100,0,0", seq_length=16,
                     data_cache_path=cache)
    # numpy, not tensors: torch's queue shares tensor storage by fd, which dies with the rank process
    return [{k: v.numpy() for k, v in b.items()} for b in _batches(cfg, tok, rank, 2, 2, gbs, 200, 0, n)]


@pytest.mark.slow
def test_dp2_under_torch_distributed(prefixes, qwen, tmp_path):
    """The real distributed path: megatron-core builds on rank 0, barriers, rank 1 loads the cache."""
    gbs, steps = 8, 3
    cache = str(tmp_path / "dist_cache")
    ranks = run_distributed(_dp_worker, 2, args=(prefixes, cache, gbs, steps * gbs // 4), timeout=240)
    ranks = [[{k: torch.from_numpy(v) for k, v in b.items()} for b in r] for r in ranks]
    dp1 = _batches(_cfg(["0.5", prefixes[0], "0.5", prefixes[1]], tmp_path), qwen, 0, 1, 2, gbs, 200, 0,
                   steps * gbs // 2)
    _assert_same_global_batches(dp1, ranks, gbs)


def test_sampler_matches_megatron_rule():
    # reference: Megatron's MegatronPretrainingSampler, written out
    def reference(total, consumed, mbs, rank, dp):
        out, batch = [], []
        for idx in range(consumed, total):
            batch.append(idx)
            if len(batch) == mbs * dp:
                out.append(batch[rank * mbs:(rank + 1) * mbs])
                batch = []
        return out

    for args in [(50, 0, 2, 0, 1), (50, 6, 2, 1, 3), (51, 12, 3, 2, 4), (8, 8, 1, 0, 2)]:
        assert list(PretrainingSampler(*args)) == reference(*args)
        assert len(PretrainingSampler(*args)) == len(reference(*args))
    with pytest.raises(ValueError, match="consumed_samples=60"):
        PretrainingSampler(50, 60, 2, 0, 1)


def test_collate_maskable_excludes_eod_and_bos(qwen):
    toks = np.array([5, qwen.eod_id, 7, qwen.bos_id, qwen.mask_id, 9], dtype=np.int64)
    b = collate_pretrain([{"tokens": toks, "sample_index": 11}, {"tokens": toks[::-1].copy(), "sample_index": 12}],
                         (qwen.eod_id, qwen.bos_id))
    assert b["tokens"].dtype == torch.long and b["tokens"].shape == (2, 6)
    assert b["sample_index"].tolist() == [11, 12]
    assert b["maskable"][0].tolist() == [True, False, True, False, True, True]


def test_config_and_bad_data_errors(prefixes, qwen, tmp_path):
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_split("98,1,1") == pytest.approx([0.98, 0.01, 0.01])
    bad = DataConfig(data_path=["0.7", "a", "b"], split="x", seq_length=0, tokenizer_type="nope")
    errors = " | ".join(bad.problems())
    for part in ("WEIGHT PREFIX", "data.split='x'", "seq_length=0", "tokenizer_type='nope'"):
        assert part in errors
    assert DataConfig(data_path=[prefixes[0]]).problems() == []
    with pytest.raises(DatasetFormatError, match="not found: missing"):
        build_pretrain_datasets(_cfg([str(tmp_path / "nope")], tmp_path), qwen, 10)
    with pytest.raises(DatasetFormatError, match="the valid split .* is empty"):
        build_pretrain_datasets(_cfg(prefixes[1:], tmp_path, split="99,1,0"), qwen, 10, valid_samples=4)


def test_mock_data(qwen, tmp_path):
    cfg = DataConfig(mock_data=True, seq_length=4096, split="1,0,0")
    train = build_pretrain_datasets(cfg, qwen, train_samples=20)["train"]
    s = train[3]
    assert s["tokens"].shape == (4096,) and s["sample_index"] == 3 and s["tokens"].max() < qwen.vocab_size
