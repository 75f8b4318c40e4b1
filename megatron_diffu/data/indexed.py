"""A thin, validating layer over megatron-core's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Format (docs/ALGORITHMS.md sec. 6): ``.idx`` = magic ``MMIDIDX\\x00\\x00``, <Q version=1, <B dtype code,
<Q sequence count, <Q document count, int32 sequence lengths, int64 sequence byte pointers,
int64 document indices; ``.bin`` = the raw token ids.  megatron-core's reader only asserts on a
bad header and happily memory-maps a truncated file, so :func:`validate_indexed_dataset` checks
every size against the file lengths first and names the file, byte offset and the fix.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional, Type

import numpy as np

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
_DTYPE_MAX = {1: 2**8 - 1, 2: 2**7 - 1, 3: 2**15 - 1, 4: 2**31 - 1, 5: 2**63 - 1, 8: 2**16 - 1}

__all__ = [
    "IndexedDataset", "IndexedDatasetBuilder", "IndexInfo", "DatasetFormatError", "token_dtype",
    "validate_indexed_dataset", "open_indexed_dataset", "get_bin_path", "get_idx_path",
]


class DatasetFormatError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated, corrupt or does not fit the tokenizer."""


@dataclass(frozen=True)
class IndexInfo:
    prefix: str
    dtype: Type[np.number]
    dtype_code: int
    sequence_count: int
    document_count: int  # entries in the document index (= documents + 1)
    num_tokens: int
    bin_bytes: int

    @property
    def num_documents(self) -> int:
        return self.document_count - 1


def token_dtype(vocab_size: int) -> Type[np.number]:
    """The token dtype megatron-LM's preprocess tool picks: uint16 below 65500 ids, else int32."""
    return DType.optimal_dtype(vocab_size)


def _fail(path: str, what: str, fix: str) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: {what}. {fix}")


_REBUILD = "Re-run tools/preprocess_data.py to rebuild this dataset (a partial copy or an interrupted write?)."


def _read_header(idx_path: str, idx_bytes: int) -> tuple:
    if idx_bytes < HEADER_BYTES:
        raise _fail(idx_path, f"truncated index: {idx_bytes} bytes, the header alone needs {HEADER_BYTES}", _REBUILD)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:9] != MAGIC:
        raise _fail(idx_path, f"not a Megatron index (byte offset 0: magic {head[:9]!r}, expected {MAGIC!r})",
                    "Pass the prefix of a file written by tools/preprocess_data.py (without .bin/.idx).")
    version = struct.unpack("<Q", head[9:17])[0]
    if version != 1:
        raise _fail(idx_path, f"unsupported index version {version} at byte offset 9 (expected 1)", _REBUILD)
    code = head[17]
    if code not in _DTYPE_MAX and code not in (6, 7):
        raise _fail(idx_path, f"unknown dtype code {code} at byte offset 17", _REBUILD)
    if code in (6, 7):
        raise _fail(idx_path, f"dtype code {code} is a float type; token ids must be integers", _REBUILD)
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    return code, seq_count, doc_count


def validate_indexed_dataset(prefix: str, vocab_size: Optional[int] = None,
                             check_tokens: bool = False, multimodal: bool = False) -> IndexInfo:
    """Check a ``PREFIX.{bin,idx}`` pair thoroughly; raise :class:`DatasetFormatError` naming the problem.

    Checks: both files exist; magic, version, dtype; the ``.idx`` length equals what its counts
    imply; lengths are non-negative, pointers contiguous, the document index monotone and ending
    at the sequence count; the ``.bin`` length equals the token count times the dtype size.
    With ``vocab_size``: the dtype can hold the vocabulary, and (``check_tokens``) every token id
    in the ``.bin`` is below ``vocab_size`` (one vectorised pass over the file).
    """
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = " Pass the prefix without the .bin/.idx extension."
        elif os.path.isfile(prefix + "_text_document.idx"):
            hint = f" Did you mean {prefix}_text_document?"
        raise DatasetFormatError(
            f"dataset prefix {prefix!r} not found: missing {', '.join(missing)}.{hint} "
            "Create it with tools/preprocess_data.py --output-prefix ...")
    idx_bytes = os.path.getsize(idx_path)
    code, seq_count, doc_count = _read_header(idx_path, idx_bytes)
    expected = HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8 + (seq_count if multimodal else 0)
    if idx_bytes != expected:
        raise _fail(idx_path, f"size {idx_bytes} bytes does not match its header ({seq_count} sequences, "
                    f"{doc_count} document entries -> {expected} bytes): truncated or corrupt", _REBUILD)
    if doc_count < 1:
        raise _fail(idx_path, "document index is empty (needs at least the leading 0)", _REBUILD)
    idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(idx, dtype=np.int32, count=seq_count, offset=HEADER_BYTES)
    pointers = np.frombuffer(idx, dtype=np.int64, count=seq_count, offset=HEADER_BYTES + 4 * seq_count)
    docs = np.frombuffer(idx, dtype=np.int64, count=doc_count, offset=HEADER_BYTES + 12 * seq_count)
    itemsize = DType.size(code)
    _check_index_arrays(idx_path, lengths, pointers, docs, seq_count, itemsize)
    num_tokens = int(lengths.sum(dtype=np.int64))
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes != num_tokens * itemsize:
        raise _fail(bin_path, f"size {bin_bytes} bytes, but {idx_path} describes {num_tokens} tokens of "
                    f"{itemsize} bytes = {num_tokens * itemsize} bytes: truncated or mismatched .bin/.idx", _REBUILD)
    dtype = DType.dtype_from_code(code)
    if vocab_size is not None:
        _check_vocab(prefix, bin_path, code, dtype, vocab_size, check_tokens)
    return IndexInfo(prefix, dtype, code, seq_count, doc_count, num_tokens, bin_bytes)


def _check_index_arrays(idx_path: str, lengths: np.ndarray, pointers: np.ndarray, docs: np.ndarray,
                        seq_count: int, itemsize: int) -> None:
    if seq_count and lengths.min() < 0:
        bad = int(np.argmax(lengths < 0))
        raise _fail(idx_path, f"negative length at sequence {bad} (byte offset {HEADER_BYTES + 4 * bad})", _REBUILD)
    if seq_count:
        expect = np.zeros(seq_count, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expect[1:])
        if not np.array_equal(expect, pointers):
            bad = int(np.argmax(expect != pointers))
            off = HEADER_BYTES + 4 * seq_count + 8 * bad
            raise _fail(idx_path, f"sequence pointer {bad} (byte offset {off}) is {int(pointers[bad])}, "
                        f"expected {int(expect[bad])}: corrupt index", _REBUILD)
    if docs[0] != 0 or docs[-1] != seq_count or (len(docs) > 1 and np.any(np.diff(docs) < 0)):
        raise _fail(idx_path, f"document index must rise from 0 to the sequence count {seq_count} "
                    f"(first {int(docs[0])}, last {int(docs[-1])}): corrupt index", _REBUILD)


def _check_vocab(prefix: str, bin_path: str, code: int, dtype: Type[np.number], vocab_size: int,
                 check_tokens: bool) -> None:
    if vocab_size - 1 > _DTYPE_MAX[code]:
        raise DatasetFormatError(
            f"{prefix}: tokens are stored as {np.dtype(dtype).name} (max id {_DTYPE_MAX[code]}), but the "
            f"tokenizer has {vocab_size} ids: this data was made with a different (smaller) tokenizer. "
            "Re-run tools/preprocess_data.py with the tokenizer you train with.")
    if not check_tokens or os.path.getsize(bin_path) == 0:
        return
    data = np.memmap(bin_path, mode="r", dtype=dtype)
    chunk = 1 << 24
    for start in range(0, len(data), chunk):
        part = data[start:start + chunk]
        top = int(part.max())
        if top >= vocab_size or (np.issubdtype(dtype, np.signedinteger) and int(part.min()) < 0):
            pos = start + int(np.argmax((part >= vocab_size) | (part < 0)))
            raise DatasetFormatError(
                f"{bin_path}: token id {int(data[pos])} at token {pos} (byte offset "
                f"{pos * np.dtype(dtype).itemsize}) is outside the tokenizer's vocabulary of {vocab_size}: "
                "this data was made with a different tokenizer. Re-run tools/preprocess_data.py with "
                "the tokenizer you train with.")


def open_indexed_dataset(prefix: str, vocab_size: Optional[int] = None, check_tokens: bool = False,
                         mmap: bool = True) -> IndexedDataset:
    """Validate, then open with megatron-core's :class:`IndexedDataset`."""
    validate_indexed_dataset(prefix, vocab_size=vocab_size, check_tokens=check_tokens)
    return IndexedDataset(prefix, multimodal=False, mmap=mmap)
