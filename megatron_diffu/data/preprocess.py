"""Raw code / JSONL -> Megatron indexed datasets (``PREFIX_{key}_document.{bin,idx}``).

Pipeline: the inputs are cut into ordered *chunks* (a byte range of a JSONL file aligned to line
starts, or a group of source files) whose boundaries depend only on the inputs, never on the
number of workers.  Workers tokenize chunks in parallel, each into its own partial dataset written
by megatron-core's ``IndexedDatasetBuilder``; the main process merges the partials in chunk order
(``IndexedDatasetBuilder.add_index``).  So ``--workers 2`` writes the same bytes as ``--workers 1``.

Atomicity: everything is written under ``PREFIX.tmp-<pid>/`` and the finished ``.bin``/``.idx``
are moved into place with ``common.atomic.AtomicFiles`` (an existing ``.idx`` is removed first
and the new one moved last, so no moment pairs an old index with a new ``.bin``).  Ctrl-C, SIGTERM or an error remove the temporary
directory and leave no ``.bin``/``.idx`` a later run could load.

Bad input (malformed JSON line, missing key, non-string value, non-UTF-8 bytes, unreadable file)
raises :class:`InputError` naming the file and line / byte offset; with ``skip_bad`` it is skipped,
counted and listed in the summary.

An empty document (an empty ``__init__.py``, ``{"text": ""}``) is not an error: it is kept as
Megatron-LM's ``tools/preprocess_data.py`` keeps it, a document with no sequence (its
``add_document([], [])``: no tokens, no EOD even with ``--append-eod``, one more document index), so
the ``.bin``/``.idx`` stay byte-identical to Megatron's on any corpus; the summary counts them.
"""
from __future__ import annotations

import glob
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_diffu.common.atomic import AtomicFiles
from megatron_diffu.common.progress import Progress
from megatron_diffu.data.tokenizer import Tokenizer, build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
DEFAULT_CHUNK_BYTES = 1 << 21  # 2 MiB of input per chunk: small enough to balance 2+ workers
MAX_FILES_PER_CHUNK = 256


class InputError(ValueError):
    """A bad input document; the message names the file and line / byte offset and the fix."""


@dataclass
class PreprocessConfig:
    """Options of ``tools/preprocess_data.py`` (names follow Megatron-LM's flags)."""

    input: List[str]
    output_prefix: str
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    extensions: Optional[List[str]] = None  # for directories / globs of source files, e.g. [".py"]
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: Optional[str] = None  # None: the Qwen tokenizer (Dream-compatible)
    append_eod: bool = False
    workers: int = 1
    skip_bad: bool = False
    exclude_dirs: List[str] = field(default_factory=list)  # directory names to skip, e.g. ["test"]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    log_interval: float = 1.0  # seconds between progress lines (0: none)


@dataclass(frozen=True)
class Chunk:
    index: int
    kind: str  # "jsonl" or "files"
    path: str = ""  # jsonl: the file
    start: int = 0  # jsonl: byte range [start, end), aligned to line starts
    end: int = 0
    files: Tuple[str, ...] = ()  # files: one document each

    @property
    def nbytes(self) -> int:
        return self.end - self.start if self.kind == "jsonl" else sum(os.path.getsize(f) for f in self.files)


@dataclass
class ChunkResult:
    index: int
    prefixes: Dict[str, str]  # json key -> partial dataset prefix
    documents: int = 0
    tokens: int = 0
    nbytes: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (location, reason)
    empty: int = 0  # documents kept with no tokens (Megatron's empty documents), counted over the keys


@dataclass
class Summary:
    outputs: Dict[str, str]
    documents: int
    tokens: int
    nbytes: int
    seconds: float
    skipped: List[Tuple[str, str]]
    startup_seconds: float = 0.0  # imports and tokenizer load, before the first chunk
    empty: int = 0  # empty documents kept (no tokens, as Megatron-LM keeps them)

    def format(self) -> str:
        work = max(self.seconds - self.startup_seconds, 1e-9)
        lines = [f"done in {self.seconds:.1f}s ({self.startup_seconds:.1f}s start-up): {self.documents} documents, "
                 f"{self.tokens} tokens, {self.nbytes / 1e6:.1f} MB input ({self.tokens / work:,.0f} tokens/s, "
                 f"{self.nbytes / 1e6 / work:.2f} MB/s after start-up)"]
        for key, prefix in self.outputs.items():
            lines.append(f"  {key}: {prefix}.bin / {prefix}.idx")
        lines.append(f"empty documents kept: {self.empty} (no tokens and no EOD, as Megatron-LM's "
                     f"preprocess_data.py keeps them)")
        if self.skipped:
            reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
            lines.append(f"skipped {len(self.skipped)} inputs: " +
                         ", ".join(f"{n} {r}" for r, n in reasons.most_common()))
            for where, reason in self.skipped[:20]:
                lines.append(f"  {where}: {reason}")
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        else:
            lines.append("skipped 0 inputs")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- input discovery
def _is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES) or path.endswith(tuple(s + ".gz" for s in JSONL_SUFFIXES))


def _walk(root: str, extensions: Optional[Sequence[str]], exclude_dirs: Sequence[str]) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if extensions is None or name.endswith(tuple(extensions)):
                found.append(os.path.join(dirpath, name))
    return found


def discover_inputs(inputs: Sequence[str], extensions: Optional[Sequence[str]] = None,
                    exclude_dirs: Sequence[str] = ()) -> List[str]:
    """Expand ``--input`` values (files, globs, directories) into an ordered list of files.

    Directories are walked in sorted order (hidden and ``exclude_dirs`` folders skipped) and
    filtered by ``extensions``; globs are sorted. The order defines the document order.
    """
    files: List[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise InputError(f"--input {item!r}: the glob matches no files")
        for m in matches:
            if os.path.isdir(m):
                files.extend(_walk(m, extensions, exclude_dirs))
            elif os.path.isfile(m):
                if _is_jsonl(m) or extensions is None or m.endswith(tuple(extensions)):
                    files.append(m)
            else:
                raise InputError(f"--input {m!r}: no such file or directory")
    if not files:
        raise InputError(f"--input {list(inputs)}: no input files found"
                         + (f" with extensions {list(extensions)}" if extensions else ""))
    return files


def _jsonl_boundaries(path: str, chunk_bytes: int) -> List[int]:
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + chunk_bytes < size:
            f.seek(bounds[-1] + chunk_bytes)
            f.readline()  # move to the start of the next line
            pos = f.tell()
            if pos >= size:
                break
            bounds.append(pos)
    bounds.append(size)
    return bounds


def make_chunks(files: Sequence[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> List[Chunk]:
    """Cut the inputs into ordered chunks; depends only on the inputs and ``chunk_bytes``."""
    chunks: List[Chunk] = []
    group: List[str] = []
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            chunks.append(Chunk(len(chunks), "files", files=tuple(group)))
            group, group_bytes = [], 0

    for path in files:
        if _is_jsonl(path):
            flush()
            if path.endswith(".gz"):
                chunks.append(Chunk(len(chunks), "jsonl", path=path, start=0, end=os.path.getsize(path)))
                continue
            bounds = _jsonl_boundaries(path, chunk_bytes)
            for a, b in zip(bounds[:-1], bounds[1:]):
                chunks.append(Chunk(len(chunks), "jsonl", path=path, start=a, end=b))
            continue
        group.append(path)
        group_bytes += os.path.getsize(path)
        if group_bytes >= chunk_bytes or len(group) >= MAX_FILES_PER_CHUNK:
            flush()
    flush()
    return chunks


# ----------------------------------------------------------------------------- reading documents
def _line_number(path: str, offset: int) -> int:
    """1-based line number of the byte ``offset`` (only computed on the error path)."""
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < offset:
            block = f.read(min(1 << 20, offset - pos))
            if not block:
                break
            count += block.count(b"\n")
            pos += len(block)
    return count + 1


def _utf8_error(data: bytes, err: UnicodeDecodeError, unit: str = "file") -> str:
    return f"not UTF-8: invalid byte 0x{data[err.start]:02x} at byte {err.start} of the {unit}"


def _iter_jsonl(chunk: Chunk, keys: Sequence[str]) -> Iterator[Tuple[str, Optional[Dict[str, str]], str]]:
    """Yield ``(location, {key: text} or None, error)`` per non-blank line of the chunk."""
    opener = _open_maybe_gz(chunk.path)
    start_line: Optional[int] = None
    with opener as f:
        f.seek(chunk.start)
        offset, line_in_chunk = chunk.start, 0
        while offset < chunk.end or chunk.path.endswith(".gz"):
            raw = f.readline()
            if not raw:
                break
            here, offset = offset, offset + len(raw)
            line_in_chunk += 1
            if not raw.strip():
                continue

            def where() -> str:
                nonlocal start_line
                if chunk.path.endswith(".gz"):
                    return f"{chunk.path}:{line_in_chunk}"
                if start_line is None:
                    start_line = _line_number(chunk.path, chunk.start)
                return f"{chunk.path}:{start_line + line_in_chunk - 1} (byte offset {here})"

            yield _parse_line(raw, keys, where)


def _open_maybe_gz(path: str):
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _parse_line(raw: bytes, keys: Sequence[str], where: Callable[[], str]):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return where(), None, _utf8_error(raw, err, "line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return where(), None, f"malformed JSON: {err.msg} at column {err.colno}"
    if not isinstance(obj, dict):
        return where(), None, f"malformed JSON: expected an object, got {type(obj).__name__}"
    texts = {}
    for key in keys:
        if key not in obj:
            present = ", ".join(sorted(map(str, obj))[:10])
            return where(), None, f"missing key {key!r} (keys present: {present}; choose with --json-keys)"
        if not isinstance(obj[key], str):
            return where(), None, f"bad value: key {key!r} holds {type(obj[key]).__name__}, expected a string"
        texts[key] = obj[key]
    return where(), texts, ""


def _iter_files(chunk: Chunk, key: str) -> Iterator[Tuple[str, Optional[Dict[str, str]], str]]:
    for path in chunk.files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            yield path, None, f"unreadable: {err.strerror}"
            continue
        try:
            yield path, {key: data.decode("utf-8")}, ""
        except UnicodeDecodeError as err:
            yield path, None, _utf8_error(data, err)


# ----------------------------------------------------------------------------- chunk worker
_WORKER: Dict[str, object] = {}


def _init_worker(cfg: PreprocessConfig, tmpdir: str) -> None:
    # One core per worker: the workers are the parallelism (and --workers 1 means one core).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER.update(cfg=cfg, tmpdir=tmpdir, tok=build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model))


def _process_chunk_in_worker(chunk: Chunk) -> ChunkResult:
    return process_chunk(chunk, _WORKER["cfg"], _WORKER["tok"], _WORKER["tmpdir"])  # type: ignore[arg-type]


def process_chunk(chunk: Chunk, cfg: PreprocessConfig, tok: Tokenizer, tmpdir: str) -> ChunkResult:
    """Tokenize one chunk into partial datasets ``tmpdir/part-XXXXXX_{key}``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    from megatron_diffu.data.indexed import token_dtype

    keys = list(cfg.json_keys)
    docs = _iter_jsonl(chunk, keys) if chunk.kind == "jsonl" else _iter_files(chunk, keys[0])
    result = ChunkResult(chunk.index, {k: os.path.join(tmpdir, f"part-{chunk.index:06d}_{k}") for k in keys})
    good: List[Dict[str, str]] = []
    for where, texts, error in docs:
        if error:
            _bad(result, cfg, where, error)
            continue
        assert texts is not None
        good.append(texts)
        result.nbytes += sum(len(t.encode("utf-8")) for t in texts.values())
    dtype = token_dtype(tok.vocab_size)
    for key in keys:
        encoded = tok.encode_batch([t[key] for t in good])
        builder = IndexedDatasetBuilder(get_bin_path(result.prefixes[key]), dtype=dtype)
        for ids in encoded:
            if not ids:  # Megatron: no sequence, no EOD, the document index still advances
                builder.add_document(np.asarray([], dtype=dtype), [])
                result.empty += 1
                continue
            if cfg.append_eod:
                ids.append(tok.eod_id)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            result.tokens += len(ids)
        builder.finalize(get_idx_path(result.prefixes[key]))
    result.documents = len(good)
    return result


def _bad(result: ChunkResult, cfg: PreprocessConfig, where: str, reason: str) -> None:
    if not cfg.skip_bad:
        raise InputError(f"{where}: {reason}. Fix the input or pass --skip-bad to skip and count such inputs.")
    result.skipped.append((where, reason))


# ----------------------------------------------------------------------------- driver
class _Terminated(BaseException):
    """Raised in the main process by SIGTERM so that `finally` blocks clean up."""


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001
    raise _Terminated()


def progress_reporter(total_bytes: int, interval: float, label: str = "[preprocess]", stream=None) -> Progress:
    """The tokenizers' progress line (`common.progress.Progress`): input MB read, docs, tokens, ETA;
    every `interval` seconds (0: none) and once at the end."""
    out = sys.stderr if stream is None else stream
    return Progress(total_bytes, label, unit="MB", scale=2**20, decimals=1, every_s=interval, enabled=interval > 0,
                    counters=("docs", "tokens"), log=lambda line: print(line, file=out, flush=True))


def output_prefixes(cfg: PreprocessConfig) -> Dict[str, str]:
    """Megatron-LM's names: ``{output_prefix}_{key}_document`` per JSON key."""
    return {k: f"{cfg.output_prefix}_{k}_document" for k in cfg.json_keys}


def _check_config(cfg: PreprocessConfig, files: Sequence[str]) -> None:
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
    if not cfg.json_keys:
        raise ValueError("--json-keys needs at least one key")
    if len(cfg.json_keys) > 1 and any(not _is_jsonl(f) for f in files):
        raise ValueError("several --json-keys need JSONL inputs; source files are one document of one key")
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--output-prefix {cfg.output_prefix!r}: directory {out_dir} does not exist")


def run_preprocess(cfg: PreprocessConfig) -> Summary:
    """Run the whole pipeline; returns the summary (the CLI prints it)."""
    t0 = time.monotonic()
    files = discover_inputs(cfg.input, cfg.extensions, cfg.exclude_dirs)
    _check_config(cfg, files)
    chunks = make_chunks(files, cfg.chunk_bytes)
    sizes = {c.index: c.nbytes for c in chunks}
    finals = output_prefixes(cfg)
    tmpdir = f"{os.path.abspath(cfg.output_prefix)}.tmp-{os.getpid()}"
    os.makedirs(tmpdir, exist_ok=False)
    old_term = signal.getsignal(signal.SIGTERM)
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_terminated)
    pool = None
    # One core per worker (also for --workers 1, which tokenizes in this process): the
    # workers are the parallelism, so the Rust tokenizer's own thread pool stays off.
    old_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
        builders = _open_final_builders(finals, tmpdir, tok)
        progress = progress_reporter(sum(sizes.values()), cfg.log_interval)
        nbytes = 0
        skipped: List[Tuple[str, str]] = []
        empty = 0
        if cfg.workers == 1:
            results = (process_chunk(c, cfg, tok, tmpdir) for c in chunks)
        else:
            pool = _make_pool(cfg, tmpdir)
            results = _ordered_map(pool, chunks, window=4 * cfg.workers)
        for res in results:
            _merge(builders, res)
            skipped.extend(res.skipped)
            empty += res.empty
            nbytes += res.nbytes
            progress.update(sizes[res.index], force=res.index == len(chunks) - 1, docs=res.documents, tokens=res.tokens)
        if pool is not None:
            pool.shutdown(wait=True)
            pool = None
        _finalize(builders, finals, tmpdir)
        return Summary(finals, progress.counts["docs"], progress.counts["tokens"], nbytes, time.monotonic() - t0,
                       skipped, progress.start - t0, empty=empty)
    finally:
        if pool is not None:
            _kill_pool(pool)
        shutil.rmtree(tmpdir, ignore_errors=True)
        if old_parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old_parallelism
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _make_pool(cfg: PreprocessConfig, tmpdir: str) -> ProcessPoolExecutor:
    # fork: workers inherit the imported megatron-core (a 5-15 s import) and start in milliseconds.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context(method), initializer=_init_worker,
                               initargs=(cfg, tmpdir))


def _ordered_map(pool: ProcessPoolExecutor, chunks: Sequence[Chunk], window: int) -> Iterator[ChunkResult]:
    """Results in input order (= merge order) with at most ``window`` chunks in flight.

    The window bounds memory and the partial files waiting on disk for huge inputs. A worker that
    dies (OOM kill, segfault) raises BrokenProcessPool here instead of hanging.
    """
    pending: Deque[Future] = deque()
    todo = iter(chunks)
    for chunk in itertools.islice(todo, window):
        pending.append(pool.submit(_process_chunk_in_worker, chunk))
    while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(_process_chunk_in_worker, nxt))
        yield result


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (not after their current chunk), so none writes into the removed tmpdir."""
    procs = list(getattr(pool, "_processes", {}).values())  # the executor has no public kill
    for p in procs:
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=10)


def _open_final_builders(finals: Dict[str, str], tmpdir: str, tok: Tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_diffu.data.indexed import token_dtype

    dtype = token_dtype(tok.vocab_size)
    return {k: IndexedDatasetBuilder(os.path.join(tmpdir, f"final_{k}.bin"), dtype=dtype) for k in finals}


def _merge(builders, res: ChunkResult) -> None:
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    for key, builder in builders.items():
        part = res.prefixes[key]
        _append_partial(builder, part)
        os.remove(get_bin_path(part))
        os.remove(get_idx_path(part))


def _append_partial(builder, prefix: str) -> None:
    """``IndexedDatasetBuilder.add_index`` without its ``gc.collect()``.

    megatron-core's add_index ends with a full garbage collection, which costs ~0.4 s per call in a
    process that has imported torch (a large heap): 10 % of the whole run on 20 MB in 2 MB chunks.
    Same steps otherwise (megatron-core's index reader, the builder's lists and data file).
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader, get_bin_path, get_idx_path

    index = _IndexReader(get_idx_path(prefix), multimodal=False)
    if index.dtype != builder.dtype:
        raise ValueError(f"{prefix}: partial dtype {index.dtype} != {builder.dtype}")
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(index.sequence_lengths.tolist())
    builder.document_indices.extend((offset + index.document_indices[1:]).tolist())
    del index
    with open(get_bin_path(prefix), "rb") as f:
        shutil.copyfileobj(f, builder.data_file)


def _finalize(builders, finals: Dict[str, str], tmpdir: str) -> None:
    for key, builder in builders.items():
        builder.finalize(os.path.join(tmpdir, f"final_{key}.idx"))
    # The renames run with SIGINT/SIGTERM held back, so a signal cannot split a .bin from its .idx.
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        for key, prefix in finals.items():  # the old .idx goes first: never paired with the new .bin
            AtomicFiles([prefix + ".bin", prefix + ".idx"], indexes=[prefix + ".idx"],
                        temps=[os.path.join(tmpdir, f"final_{key}.bin"), os.path.join(tmpdir, f"final_{key}.idx")]).commit()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
