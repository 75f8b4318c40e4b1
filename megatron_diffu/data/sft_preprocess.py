"""Library side of `tools/preprocess_sft.py`: JSONL conversations -> SFT indexed datasets.

Reuses the pretraining preprocessor's input discovery (files, globs, directories, .gz), its
`InputError` (our `BadRecord` derives from it) and its progress line (docs/s, tokens/s, MB/s,
ETA from bytes read). Bad input: a record that is not UTF-8 / valid JSON, lacks `messages` or
`prompt`+`response`, has an unknown role, does not end with an assistant turn or has no response
tokens stops the run with `file:line: problem; fix`; with `skip_bad=True` it is counted and
skipped (the first few are printed). Outputs are written under temporary names and renamed into
place only after the whole input succeeded (see `SFTWriter`).
"""
from __future__ import annotations

import multiprocessing as mp
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from megatron_diffu.data.preprocess import JSONL_SUFFIXES, discover_inputs, progress_reporter
from megatron_diffu.data.sft import BadRecord, SFTWriter, iter_jsonl, load_json_line, parse_record, tokenize_conversation

_TOK = None  # the tokenizer of this (worker) process
_VERIFY_FIRST = 64  # records per process checked against the whole-conversation template
_seen = 0


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    response_tokens: int = 0
    skipped: int = 0


def _init_worker(tokenizer_type: str, tokenizer_model: Optional[str], pool_worker: bool = True) -> None:
    global _TOK
    if pool_worker:  # a pool process of its own; in-process (workers=1) the caller's thread count stays
        import torch

        torch.set_num_threads(1)
    from megatron_diffu.data.tokenizer import build_tokenizer

    _TOK = build_tokenizer(tokenizer_type, tokenizer_model)


def _encode(item: tuple[str, int, bytes]):
    """(ids, mask, error, nbytes) of one line; errors are returned, not raised, so workers go on."""
    path, lineno, line = item
    where = f"{path}:{lineno}"
    try:
        messages = parse_record(load_json_line(path, lineno, line), where)
        global _seen
        _seen += 1
        ids, mask = tokenize_conversation(_TOK, messages, verify=_seen <= _VERIFY_FIRST)
        if not any(mask):
            raise BadRecord(f"{where}: no response tokens after tokenisation (empty assistant turns?)")
        return ids, mask, None, len(line)
    except BadRecord as exc:
        return None, None, str(exc), len(line)


def _lines(paths: Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    for p in paths:
        for lineno, line in iter_jsonl(p):
            yield p, lineno, line


def preprocess_sft(inputs: Sequence[str], output_prefix: str, tokenizer_type: str = "HuggingFaceTokenizer",
                   tokenizer_model: Optional[str] = None, workers: int = 1, skip_bad: bool = False,
                   log_interval_s: float = 10.0, stream=sys.stderr) -> PreprocessStats:
    """Tokenise every conversation of `inputs` into `output_prefix`_sft_{document,response_mask}."""
    import os

    files = discover_inputs(inputs, extensions=[s + e for s in JSONL_SUFFIXES for e in ("", ".gz")])
    progress = progress_reporter(sum(os.path.getsize(p) for p in files) or 1, log_interval_s, "[preprocess_sft]", stream)
    stats = PreprocessStats()
    writer = SFTWriter(output_prefix)
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_type, tokenizer_model)) if workers > 1 else None
    try:
        if pool is None:
            _init_worker(tokenizer_type, tokenizer_model, pool_worker=False)
            results = map(_encode, _lines(files))
        else:  # imap keeps the input order, so the output does not depend on --workers
            results = pool.imap(_encode, _lines(files), chunksize=32)
        for ids, mask, error, nbytes in results:
            if error is not None:
                if not skip_bad:
                    raise BadRecord(error + " (or rerun with --skip-bad to skip such records)")
                stats.skipped += 1
                if stats.skipped <= 5:
                    print(f"[preprocess_sft] skipping {error}", file=stream)
                progress.update(nbytes)
                continue
            writer.add(ids, mask)
            stats.documents += 1
            stats.tokens += len(ids)
            stats.response_tokens += int(sum(mask))
            progress.update(nbytes, docs=1, tokens=len(ids))
        if stats.documents == 0:
            raise BadRecord(f"no usable conversation in {list(files)} ({stats.skipped} skipped)")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    progress.finish()
    print(f"[preprocess_sft] wrote {stats.documents} conversations, {stats.tokens} tokens "
          f"({stats.response_tokens} response), skipped {stats.skipped} -> {output_prefix}_sft_*", file=stream)
    return stats
