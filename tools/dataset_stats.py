#!/usr/bin/env python
"""Statistics of Megatron indexed datasets: documents, tokens, length percentiles and histogram.

    python tools/dataset_stats.py data/stdlib_text_document [more prefixes] \\
        [--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json] [--check-tokens]

Validates each pair (header, sizes; with --check-tokens every id against the tokenizer's
vocabulary) and prints a text histogram of document lengths on log2 bins.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine/Apex are absent: irrelevant to data tools.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron_diffu.data.indexed import DatasetFormatError, validate_indexed_dataset  # noqa: E402


def document_lengths(prefix: str) -> np.ndarray:
    """Tokens per document (sums sequence lengths between document boundaries)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    seq = ds.sequence_lengths.astype(np.int64)
    docs = ds.document_indices
    csum = np.concatenate([[0], np.cumsum(seq)])
    return csum[docs[1:]] - csum[docs[:-1]]


def histogram_lines(lengths: np.ndarray, width: int = 40) -> List[str]:
    if len(lengths) == 0:
        return ["  (no documents)"]
    top = int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1)))
    edges = [0] + [2 ** k for k in range(0, top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    peak = max(int(counts.max()), 1)
    lines = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        if n:
            lines.append(f"  [{lo:>8}, {hi:>8}) {int(n):>8} {'#' * max(1, round(width * int(n) / peak))}")
    return lines


def stats_text(prefix: str, vocab_size: Optional[int] = None, check_tokens: bool = False) -> str:
    info = validate_indexed_dataset(prefix, vocab_size=vocab_size, check_tokens=check_tokens)
    lengths = document_lengths(prefix)
    lines = [f"{prefix}: {info.num_documents} documents, {info.num_tokens} tokens, dtype "
             f"{np.dtype(info.dtype).name}, {info.bin_bytes / 1e6:.1f} MB"]
    if len(lengths):
        p = np.percentile(lengths, [50, 90, 99])
        lines.append(f"  tokens/document: mean {lengths.mean():.1f}, min {lengths.min()}, p50 {p[0]:.0f}, "
                     f"p90 {p[1]:.0f}, p99 {p[2]:.0f}, max {lengths.max()}")
    lines.append("  document length histogram (tokens):")
    lines.extend(histogram_lines(lengths))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefixes", nargs="+", help="dataset prefixes (without .bin/.idx)")
    ap.add_argument("--tokenizer-type", default=None, help="check against this tokenizer's vocabulary")
    ap.add_argument("--tokenizer-model", default=None)
    ap.add_argument("--check-tokens", action="store_true", help="scan every token id (needs a tokenizer)")
    a = ap.parse_args(argv)
    vocab = None
    if a.tokenizer_type or a.tokenizer_model or a.check_tokens:
        from megatron_diffu.data.tokenizer import build_tokenizer

        vocab = build_tokenizer(a.tokenizer_type or "HuggingFaceTokenizer", a.tokenizer_model).vocab_size
    total_docs = total_tokens = 0
    try:
        for prefix in a.prefixes:
            print(stats_text(prefix, vocab, a.check_tokens))
            info = validate_indexed_dataset(prefix)
            total_docs += info.num_documents
            total_tokens += info.num_tokens
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if len(a.prefixes) > 1:
        print(f"total: {total_docs} documents, {total_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
