"""Packed, blended pretraining samples over Megatron indexed datasets (megatron-core's builders).

We use megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` unchanged for the
index math (document shuffle, packing, blending, splits, the on-disk index cache), so the
samples are the ones Megatron-LM would draw for the same ``--data-path/--split/--seed``.
Three adaptations:

* ``add_extra_token_to_sequence=False``: a sample is exactly ``seq_length`` tokens (a diffusion
  model has no shifted labels), so consecutive samples tile the token stream without overlap.
* :class:`DiffusionGPTDataset` returns the raw tokens only: GPTDataset's own ``__getitem__``
  builds causal masks/labels and rewrites pad-token ids to 0, none of which we want.
* megatron-core 0.16's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded on
  a cache miss, which fails in a single process without ``torch.distributed``; we answer rank 0
  there (:func:`_single_process_rank`), which is what that process is.

Every sample carries its **global sample index** (its position in the split's top-level
dataset): the diffusion noise key (DESIGN.md "Noise").  The index cache goes to
``data_cache_path`` or ``<directory of the first prefix>/cache``; building is distributed-aware
(rank 0 builds, the others load), so :func:`build_pretrain_datasets` must be called on every rank.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_diffu.data.config import DataConfig, parse_blend, parse_split
from megatron_diffu.data.indexed import DatasetFormatError, validate_indexed_dataset
from megatron_diffu.data.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")
_FULL_TOKEN_CHECK_BYTES = 1 << 30  # scan every token id of .bin files up to 1 GiB


class DiffusionGPTDataset(GPTDataset):
    """megatron-core GPTDataset whose items are ``{"tokens": int64 [seq_length]}`` only."""

    def __getitem__(self, idx: Optional[int]) -> Dict[str, np.ndarray]:
        text, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
        return {"tokens": text}


class DiffusionMockGPTDataset(MockGPTDataset):
    """megatron-core's synthetic data (``--mock-data``), same item format."""

    def __getitem__(self, idx: Optional[int]) -> Dict[str, np.ndarray]:
        text, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
        return {"tokens": text}


class PretrainSamples(torch.utils.data.Dataset):
    """One split: item ``i`` = ``{"tokens": int64 [S], "sample_index": i, "dataset_id": d}``.

    ``sample_index`` is the global index ``i`` in this split (the noise key); ``dataset_id`` is the
    blend member the sample came from (0 without a blend).
    """

    def __init__(self, dataset, split: str, seq_length: int, prefixes: Sequence[str]) -> None:
        self.dataset = dataset
        self.split = split
        self.seq_length = seq_length
        self.prefixes = list(prefixes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> Dict[str, object]:
        if not 0 <= idx < len(self.dataset):
            raise IndexError(f"{self.split} sample {idx} out of range [0, {len(self.dataset)})")
        item = self.dataset[int(idx)]
        tokens = np.asarray(item["tokens"], dtype=np.int64)
        if tokens.shape != (self.seq_length,):
            raise RuntimeError(f"{self.split} sample {idx} has shape {tokens.shape}, expected ({self.seq_length},)")
        return {"tokens": tokens, "sample_index": int(idx), "dataset_id": int(item.get("dataset_id", 0))}


@contextlib.contextmanager
def _single_process_rank() -> Iterator[None]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0  # this process is the only rank
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def _check_prefixes(prefixes: Sequence[str], tokenizer: Tokenizer, split: List[float],
                    sizes: Sequence[int]) -> None:
    """Validate every file and that each requested split gets at least one document."""
    bounds = np.cumsum([0.0] + split)
    for prefix in prefixes:
        check_tokens = os.path.getsize(prefix + ".bin") <= _FULL_TOKEN_CHECK_BYTES if os.path.isfile(prefix + ".bin") else False
        info = validate_indexed_dataset(prefix, vocab_size=tokenizer.vocab_size, check_tokens=check_tokens)
        for i, name in enumerate(SPLITS):
            if split[i] <= 0 or not sizes[i]:
                continue
            beg = int(round(bounds[i] * info.sequence_count))
            end = int(round(bounds[i + 1] * info.sequence_count))
            if end <= beg:
                raise DatasetFormatError(
                    f"{prefix}: the {name} split ({split[i]:.4g} of {info.sequence_count} documents) is empty "
                    f"but {sizes[i]} {name} samples were requested: use more documents, a larger {name} "
                    f"share in --split, or 0 {name} samples")


def _gpt_config(cfg: DataConfig, tokenizer: Tokenizer, blend, cache: Optional[str]):
    return GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=blend, split=cfg.split,
        path_to_cache=cache, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, add_extra_token_to_sequence=False,
        mid_level_dataset_surplus=cfg.mid_level_dataset_surplus,
    )


def build_pretrain_datasets(cfg: DataConfig, tokenizer: Tokenizer, train_samples: int,
                            valid_samples: int = 0, test_samples: int = 0) -> Dict[str, Optional[PretrainSamples]]:
    """``{"train"|"valid"|"test": PretrainSamples or None}`` (None: split weight 0 or 0 samples).

    Each split holds at least the requested number of samples (more epochs over the documents
    when needed). Call on every rank (megatron-core builds on rank 0 first, then the others load
    the cached indices).
    """
    sizes = [int(train_samples), int(valid_samples), int(test_samples)]
    if cfg.mock_data:
        prefixes, blend, cache, cls = ["mock"], None, cfg.data_cache_path, DiffusionMockGPTDataset
    else:
        prefixes, weights = parse_blend(cfg.data_path)
        _check_prefixes(prefixes, tokenizer, parse_split(cfg.split), sizes)
        blend = (prefixes, weights)
        cache = cfg.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
        cls = DiffusionGPTDataset
    config = _gpt_config(cfg, tokenizer, blend, cache)
    if cfg.mock_data:
        config.split = cfg.split  # megatron-core forces "1,1,1" for mock data; keep the requested split
        config.split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    with _single_process_rank():
        built = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    out: Dict[str, Optional[PretrainSamples]] = {}
    for name, ds, n in zip(SPLITS, built, sizes):
        out[name] = PretrainSamples(ds, name, cfg.seq_length, prefixes) if ds is not None and n > 0 else None
    return out
