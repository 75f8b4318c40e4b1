#!/usr/bin/env python
"""Concatenate Megatron indexed datasets (same dtype) into one, atomically.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input-dir data/shards --output-prefix data/all_text_document

Inputs are validated first (sizes, header, dtype); documents keep their order (inputs in the
given order; with --input-dir, prefixes sorted by name). Written through megatron-core's
IndexedDatasetBuilder.add_index to temporary names, then moved into place (common.atomic.AtomicFiles:
the old .idx is removed first, the new one moved last).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine/Apex are absent: irrelevant to data tools.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron_diffu.common.atomic import AtomicFiles  # noqa: E402
from megatron_diffu.data.indexed import DatasetFormatError, validate_indexed_dataset  # noqa: E402


def find_prefixes(directory: str) -> List[str]:
    names = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".idx"))
    if not names:
        raise DatasetFormatError(f"--input-dir {directory}: no .idx files found")
    return [os.path.join(directory, n) for n in names]


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> dict:
    """Merge ``prefixes`` into ``output_prefix.{bin,idx}``; returns counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    infos = [validate_indexed_dataset(p) for p in prefixes]
    dtypes = {i.dtype for i in infos}
    if len(dtypes) > 1:
        detail = ", ".join(f"{i.prefix}: {i.dtype.__name__}" for i in infos)
        raise DatasetFormatError(f"cannot merge datasets of different token dtypes ({detail}): they were made with "
                                 "different tokenizers; re-run tools/preprocess_data.py with one tokenizer")
    # the old .idx is removed first and the new one moved last: never paired with the new .bin
    with AtomicFiles([output_prefix + ".bin", output_prefix + ".idx"], indexes=[output_prefix + ".idx"]) as files:
        tmp_bin, tmp_idx = (str(t) for t in files.temps)
        builder = IndexedDatasetBuilder(tmp_bin, dtype=infos[0].dtype)
        try:
            for p in prefixes:
                builder.add_index(p)
            builder.finalize(tmp_idx)
        except BaseException:
            builder.data_file.close()
            raise
    return {"datasets": len(infos), "documents": sum(i.num_documents for i in infos),
            "tokens": sum(i.num_tokens for i in infos)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx), merged in this order")
    src.add_argument("--input-dir", help="merge every PREFIX.idx/.bin pair in this directory (sorted)")
    ap.add_argument("--output-prefix", required=True)
    a = ap.parse_args(argv)
    try:
        prefixes = a.input or find_prefixes(a.input_dir)
        out = merge_datasets(prefixes, a.output_prefix)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {out['datasets']} datasets: {out['documents']} documents, {out['tokens']} tokens -> "
          f"{a.output_prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
