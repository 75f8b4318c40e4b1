"""Where the diffusion stage's micro-batches come from (CPU tensors; the stage moves them).

- `PackedWindows` (pretraining): Megatron indexed datasets through megatron-core's blended
  builder, packed `seq_length` windows, the DP-consistent Megatron sampler.
- `Conversations` (SFT): SFT prefixes written by `tools/preprocess_sft.py` (several prefixes are
  concatenated), padded/packed by `data/sft.py`; the global sample index of a row is its noise
  key, so every TP/PP/DP layout and every resume sees the same rows, t and masks.
Both position themselves at `trainer.consumed_samples` (resume) and offer held-out batches.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from megatron_diffu.data.datasets import build_pretrain_datasets
from megatron_diffu.data.loader import make_data_loader, unmaskable_ids
from megatron_diffu.data.sft import (ConcatConversations, SFTCollator, SFTConversations, SFTDataConfig, SFTDataset,
                                     split_indices)
from megatron_diffu.model.fp8_shapes import length_multiple
from megatron_diffu.training.trainer import TrainingError


class DataExhausted(TrainingError):
    """The training data ran out before train_iters."""


class PackedWindows:
    name = "packed windows"

    def __init__(self) -> None:
        self.train_iter = None
        self.valid_loader = None

    def setup(self, trainer, tokenizer) -> None:
        t = trainer.cfg.training
        valid = t.eval_iters * trainer.global_batch_size if (t.eval_interval and t.eval_iters) else 0
        splits = build_pretrain_datasets(trainer.cfg.data, tokenizer, trainer.train_iters * trainer.global_batch_size,
                                         valid, 0)
        self.train_iter = iter(self._loader(splits["train"], trainer, tokenizer, trainer.consumed_samples))
        if splits.get("valid") is not None:
            self.valid_loader = self._loader(splits["valid"], trainer, tokenizer, 0)

    @staticmethod
    def _loader(dataset, trainer, tokenizer, consumed: int):
        d = trainer.cfg.diffusion
        # DiffuLLaMA masks every position, eod included (a base model learns to end documents);
        # `mask_eod: false` keeps the eod/bos specials unmasked (docs/ALGORITHMS.md sec. 2.2)
        unmaskable = () if d.mask_eod else unmaskable_ids(tokenizer)
        return make_data_loader(dataset, tokenizer, consumed, trainer.micro_batch_size, trainer.grid.dp_rank,
                                trainer.grid.dp_size, trainer.cfg.data.num_workers, unmaskable=unmaskable)

    def micro_batches(self, trainer) -> list[dict]:
        try:
            return [next(self.train_iter) for _ in range(trainer.num_micro_batches)]
        except StopIteration:
            raise DataExhausted(f"the training data ran out at iteration {trainer.iteration} (consumed samples "
                                f"{trainer.consumed_samples}); the dataset was built for train_iters * "
                                f"global_batch_size samples") from None

    def held_out(self) -> Optional[Iterable[dict]]:
        return self.valid_loader


class _HeldOut:
    """Held-out micro-batches of this DP rank, in a fixed order (no shuffle, no packing)."""

    def __init__(self, dataset: SFTDataset, collator: SFTCollator, mbs: int, dp_rank: int, dp_size: int) -> None:
        self.dataset, self.collator = dataset, collator
        self.mbs, self.dp_rank, self.dp_size = mbs, dp_rank, dp_size

    def __iter__(self):
        n = len(self.dataset)
        step = self.mbs * self.dp_size
        for start in range(0, n - step + 1, step):
            idx = list(range(start + self.dp_rank * self.mbs, start + (self.dp_rank + 1) * self.mbs))
            yield self.collator([self.dataset.row(i, shuffle=False) for i in idx], idx)


class Conversations:
    name = "conversations"

    def __init__(self) -> None:
        self.train_set = self.collator = self.valid = None

    def setup(self, trainer, tokenizer) -> None:
        cfg, s = trainer.cfg, trainer.cfg.sft
        prefixes, weights = cfg.data.parsed_blend()
        if weights is not None:
            raise ValueError(f"SFT --data-path takes prefixes without weights (they are concatenated), got "
                             f"{cfg.data.data_path}: drop the numbers or merge the sources when preprocessing")
        convs = ConcatConversations(prefixes)
        if s.sft_valid_data_path:
            train_ids, valid = np.arange(len(convs)), SFTConversations(s.sft_valid_data_path)
            valid_ids = np.arange(len(valid))
        else:
            train_ids, valid_ids = split_indices(len(convs), s.sft_valid_fraction, cfg.data.seed)
            valid = convs
        seq = cfg.data.seq_length
        self.train_set = SFTDataset(convs, seq, cfg.data.seed, pack=s.sft_pack, indices=train_ids,
                                    pack_pad_tokens=s.sft_pack_pad_tokens)
        p = cfg.parallel  # FP8: a bucket cut shorter is padded to the FP8 length multiple (fp8_shapes.py)
        multiple = length_multiple(cfg.model, p.tensor_model_parallel_size, p.sequence_parallel, trainer.micro_batch_size)
        self.collator = SFTCollator(seq, tokenizer.pad_id, s, seed=cfg.data.seed, length_multiple=multiple)
        if len(valid_ids):
            eval_collator = SFTCollator(seq, tokenizer.pad_id, SFTDataConfig(), seed=cfg.data.seed)
            held = SFTDataset(valid, seq, cfg.data.seed, pack=False, indices=valid_ids)
            self.valid = _HeldOut(held, eval_collator, trainer.micro_batch_size, trainer.grid.dp_rank,
                                  trainer.grid.dp_size)
        if trainer.grid.rank == 0:
            print(f"[sft] {len(train_ids)} training conversations in {len(self.train_set)} rows "
                  f"({'packed' if s.sft_pack else 'one per row'}), {len(valid_ids)} held out", flush=True)

    @staticmethod
    def _indices(trainer, micro: int) -> list[int]:
        """Megatron's sampler: micro-step m of the step takes the next mbs*dp indices, rank r its slice."""
        mbs, dp = trainer.micro_batch_size, trainer.grid.dp_size
        start = trainer.consumed_samples + micro * mbs * dp + trainer.grid.dp_rank * mbs
        return list(range(start, start + mbs))

    def micro_batches(self, trainer) -> list[dict]:
        out = []
        for m in range(trainer.num_micro_batches):
            idx = self._indices(trainer, m)
            out.append(self.collator([self.train_set.row(i) for i in idx], idx))
        return out

    def held_out(self) -> Optional[Iterable[dict]]:
        return self.valid
