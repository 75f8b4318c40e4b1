"""Data-parallel sampling and collation of pretraining micro-batches.

Sampling follows Megatron-LM's ``MegatronPretrainingSampler``: from ``consumed_samples`` on,
each micro-step takes the next ``micro_batch_size * dp_size`` consecutive global sample indices
and gives data-parallel rank ``r`` the slice ``[r * mbs, (r + 1) * mbs)``.  Hence

* no index is seen twice (across ranks or steps), and a global batch of ``gbs`` samples is always
  the ``gbs`` consecutive indices after the previous one, whatever the DP size: DP=2 ranks
  together see exactly the samples of the DP=1 global batch (only their micro-batch grouping
  differs);
* resuming = building the sampler with the checkpoint's ``consumed_samples``.

TP/PP ranks of one DP replica pass the same ``data_parallel_rank`` and so read the same samples
(each reads its own memory-mapped copy: nothing is broadcast).
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_diffu.data.config import DataConfig
from megatron_diffu.data.datasets import PretrainSamples, build_pretrain_datasets
from megatron_diffu.data.tokenizer import Tokenizer


class PretrainingSampler:
    """Yields this DP rank's list of global sample indices for each micro-step."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} outside [0, {total_samples}]: the checkpoint "
                             "has consumed more samples than this dataset holds (raise --train-samples/iters?)")
        if micro_batch_size <= 0 or data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"bad sampler layout: micro_batch_size={micro_batch_size}, "
                             f"data_parallel_rank={data_parallel_rank}, data_parallel_size={data_parallel_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        step = self.micro_batch_size * self.data_parallel_size
        remaining = self.total_samples - self.consumed_samples
        return remaining // step if self.drop_last else -(-remaining // step)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.data_parallel_size
        lo = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, step):
            end = min(start + step, self.total_samples)
            if end - start < step and self.drop_last:
                return
            mine = list(range(start + lo, min(start + lo + self.micro_batch_size, end)))
            if mine:
                yield mine


def collate_pretrain(samples: Sequence[Dict[str, object]], unmaskable_ids: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
    """Stack samples into DESIGN.md's micro-batch dict.

    ``tokens`` [B, S] long (clean x0); ``sample_index`` [B] long (the noise key); ``maskable``
    [B, S] bool = not one of ``unmaskable_ids`` (docs/ALGORITHMS.md sec. 2.2: empty by default, as
    DiffuLLaMA masks every position; the eod/bos specials with ``diffusion.mask_eod: false``);
    ``dataset_id`` [B] long (blend member, for per-source logging).
    """
    tokens = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
    special = torch.tensor(unmaskable_ids, dtype=torch.long)
    return {
        "tokens": tokens,
        "sample_index": torch.tensor([int(s["sample_index"]) for s in samples], dtype=torch.long),
        "maskable": ~torch.isin(tokens, special),
        "dataset_id": torch.tensor([int(s.get("dataset_id", 0)) for s in samples], dtype=torch.long),
    }


def unmaskable_ids(tokenizer: Tokenizer) -> Tuple[int, ...]:
    """The document-boundary specials: eod and (when the vocabulary has one) bos (never masked in
    pretraining only with ``diffusion.mask_eod: false``)."""
    ids = [tokenizer.eod_id] + ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
    return tuple(sorted(set(ids)))


def make_data_loader(dataset: PretrainSamples, tokenizer: Tokenizer, consumed_samples: int,
                     micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                     num_workers: int = 0, unmaskable: Optional[Tuple[int, ...]] = None) -> torch.utils.data.DataLoader:
    """``unmaskable``: token ids the batches mark not maskable (None: the tokenizer's eod/bos)."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 data_parallel_rank, data_parallel_size)
    ids = unmaskable_ids(tokenizer) if unmaskable is None else tuple(unmaskable)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        collate_fn=functools.partial(collate_pretrain, unmaskable_ids=ids),
        persistent_workers=num_workers > 0,
    )


def _cyclic(loader: Iterable) -> Iterator:
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the evaluation split holds fewer samples than one micro-batch per "
                               "data-parallel rank: request more valid/test samples")


def build_pretrain_data_iterators(
    data_cfg: DataConfig, tokenizer: Tokenizer, data_parallel_rank: int, data_parallel_size: int,
    micro_batch_size: int, global_batch_size: int, train_samples: int, consumed_samples: int = 0,
    valid_samples: int = 0, test_samples: int = 0,
) -> Tuple[Optional[Iterator], Optional[Iterator], Optional[Iterator]]:
    """``(train_iter, valid_iter, test_iter)`` of micro-batch dicts for this data-parallel rank.

    Call on EVERY rank (megatron-core builds the index on rank 0 and barriers). ``train_samples`` =
    train_iters * global_batch_size; ``consumed_samples`` = the checkpoint's count (0 for a fresh
    run). The train iterator yields this rank's micro-batches in order: ``global_batch_size /
    (micro_batch_size * data_parallel_size)`` of them make one step. ``valid``/``test`` iterators
    cycle forever from sample 0 (Megatron's behaviour); None when the split or its count is 0.
    """
    if global_batch_size % (micro_batch_size * data_parallel_size):
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by micro_batch_size * "
                         f"data_parallel_size = {micro_batch_size * data_parallel_size}")
    if consumed_samples % global_batch_size:
        raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of global_batch_size="
                         f"{global_batch_size}: a resumed run must keep the global batch size")
    splits = build_pretrain_datasets(data_cfg, tokenizer, train_samples, valid_samples, test_samples)
    loaders = {}
    for name, start in (("train", consumed_samples), ("valid", 0), ("test", 0)):
        ds = splits[name]
        loaders[name] = None if ds is None else make_data_loader(
            ds, tokenizer, start, micro_batch_size, data_parallel_rank, data_parallel_size, data_cfg.num_workers)
    train = iter(loaders["train"]) if loaders["train"] is not None else None
    valid = _cyclic(loaders["valid"]) if loaders["valid"] is not None else None
    test = _cyclic(loaders["test"]) if loaders["test"] is not None else None
    return train, valid, test


__all__ = ["PretrainingSampler", "collate_pretrain", "unmaskable_ids", "make_data_loader",
           "build_pretrain_data_iterators"]
