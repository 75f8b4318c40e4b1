"""`DataConfig`: where pretraining samples come from (field names = Megatron argument names)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_diffu.data.tokenizer import HF_TYPES, SP_TYPES
from megatron_diffu.config import SectionConfig


@dataclass
class DataConfig(SectionConfig):
    """Pretraining data.

    ``data_path``: Megatron blend syntax, either prefixes ``[A, B]`` (weights = their sizes) or
    ``[0.7, A, 0.3, B]`` (``--data-path 0.7 A 0.3 B``); prefixes without ``.bin``/``.idx``.
    ``split``: train/valid/test weights over the documents of each prefix (``98,1,1``).
    ``data_cache_path``: where the sample indices are cached; None: ``<dir of first prefix>/cache``.
    ``num_workers``: DataLoader worker processes (0: load in the training process; samples are
    memory-mapped slices, so 0 is the right default on small CPU hosts).
    ``mock_data``: megatron-core's synthetic GPT data instead of ``data_path``.
    ``seed``: shuffles documents and samples (Megatron uses the one ``--seed``).
    """

    data_path: List[str] = field(default_factory=list)
    split: str = "969,30,1"
    seq_length: int = 2048
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: Optional[str] = None  # None: the Qwen tokenizer (Dream-compatible specials)
    make_vocab_size_divisible_by: int = 128
    data_cache_path: Optional[str] = None
    num_workers: int = 0
    seed: int = 1234
    mock_data: bool = False
    mid_level_dataset_surplus: float = 0.005

    def parsed_blend(self) -> Tuple[List[str], Optional[List[float]]]:
        """``(prefixes, weights or None)`` from ``data_path``; raises ValueError on a bad blend."""
        return parse_blend(self.data_path)

    def problems(self) -> List[str]:
        errors: List[str] = []
        if not self.mock_data:
            if not self.data_path:
                errors.append("data.data_path is empty: pass --data-path PREFIX (or 0.7 A 0.3 B) or --mock-data")
            else:
                try:
                    parse_blend(self.data_path)
                except ValueError as exc:
                    errors.append(str(exc))
        try:
            parse_split(self.split)
        except ValueError as exc:
            errors.append(str(exc))
        if self.seq_length < 1:
            errors.append(f"data.seq_length={self.seq_length} must be >= 1")
        if self.tokenizer_type not in HF_TYPES + SP_TYPES:
            errors.append(f"data.tokenizer_type={self.tokenizer_type!r} is not one of "
                          "HuggingFaceTokenizer, SentencePieceTokenizer")
        if self.tokenizer_type in SP_TYPES and not self.tokenizer_model:
            errors.append("data.tokenizer_type=SentencePieceTokenizer needs --tokenizer-model PATH.model")
        if self.make_vocab_size_divisible_by < 1:
            errors.append(f"data.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} must be >= 1")
        if self.num_workers < 0:
            errors.append(f"data.num_workers={self.num_workers} must be >= 0")
        return errors


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_blend(data_path: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's ``--data-path``: ``A B`` or ``w1 A w2 B`` (weights need not sum to 1)."""
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("data.data_path is empty")
    if not _is_number(items[0]):
        if any(_is_number(x) for x in items):
            raise ValueError(f"data.data_path {items}: mix of weights and prefixes; use 'PREFIX ...' or "
                             "'WEIGHT PREFIX WEIGHT PREFIX ...'")
        return items, None
    if len(items) % 2:
        raise ValueError(f"data.data_path {items}: weighted blends need pairs 'WEIGHT PREFIX' (odd count)")
    weights, prefixes = items[0::2], items[1::2]
    bad = [w for w in weights if not _is_number(w)] + [p for p in prefixes if _is_number(p)]
    if bad:
        raise ValueError(f"data.data_path {items}: expected 'WEIGHT PREFIX' pairs, got {bad[0]!r} out of place")
    w = [float(x) for x in weights]
    if any(x <= 0 for x in w):
        raise ValueError(f"data.data_path {items}: weights must be > 0")
    return prefixes, w


def parse_split(split: str) -> List[float]:
    """``'98,1,1'`` -> normalised ``[0.98, 0.01, 0.01]`` (missing entries are 0)."""
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"data.split={split!r}: expected comma-separated numbers like '98,1,1'") from None
    if not 1 <= len(vals) <= 3 or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"data.split={split!r}: expected up to 3 non-negative weights with a positive sum")
    vals += [0.0] * (3 - len(vals))
    total = sum(vals)
    return [v / total for v in vals]
