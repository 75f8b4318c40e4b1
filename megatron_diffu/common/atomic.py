"""The one way this package writes an output: to a temporary name beside it, then `os.replace`.

A reader (or a crash) sees either the previous file or the complete new one, never a half-written
one. Directories get the same treatment with `atomic_dir` (an existing directory of that name is
replaced only after the new one is complete).

Writers that fill their files over a lifetime longer than one `with` block (streaming writers:
open in `__init__`, commit in `close()`), or that write a group of files a reader needs together
(a data file and its index, e.g. Megatron's `.bin`/`.idx`), use `AtomicFiles`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


def temporary_sibling(path: PathLike, tag: str = "tmp") -> Path:
    """`<name>.<tag>-<pid>` in the same directory (same filesystem, so `os.replace` is atomic)."""
    p = Path(path)
    return p.with_name(f"{p.name}.{tag}-{os.getpid()}")


def fsync_path(path: PathLike) -> None:
    """Flush one file, or one directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: PathLike) -> None:
    """Flush every file under `directory` (sorted order) and then the directory's entries."""
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(directory)


class AtomicFiles:
    """Output files written under temporary names (`temps[i]` for `finals[i]`), then moved into
    place by `commit()` or removed by `abort()`; as a context manager, commit on success and abort
    on error.

    `temps` default to `temporary_sibling(final)`; explicit ones (e.g. inside a work directory)
    must be on the final's filesystem. `fsync`: flush each temporary before it is moved.
    `indexes`: the finals (among `finals`) a reader opens first to find the others (Megatron's
    `.idx` of a `.bin`): their previous versions are removed before anything is moved, and they are
    moved last, so no moment pairs an old index with new data (a reader sees the old group, no
    index, or the new group). Otherwise the moves run in the given order.
    """

    def __init__(self, finals: Sequence[PathLike], temps: Optional[Sequence[PathLike]] = None,
                 fsync: bool = False, indexes: Iterable[PathLike] = ()) -> None:
        self.finals = [Path(p) for p in finals]
        self.temps = [temporary_sibling(p) for p in self.finals] if temps is None else [Path(p) for p in temps]
        if len(self.temps) != len(self.finals):
            raise ValueError(f"{len(self.temps)} temporary paths for {len(self.finals)} files")
        self.indexes = [Path(p) for p in indexes]
        unknown = [str(p) for p in self.indexes if p not in self.finals]
        if unknown:
            raise ValueError(f"index file(s) {unknown} are not among the files {[str(p) for p in self.finals]}")
        self.fsync = fsync

    def commit(self) -> None:
        """Move every temporary into place (on an error, the remaining temporaries are removed)."""
        try:
            if self.fsync:
                for tmp in self.temps:
                    if tmp.exists():
                        fsync_path(tmp)
            for index in self.indexes:
                with contextlib.suppress(FileNotFoundError):
                    index.unlink()
            pairs = list(zip(self.temps, self.finals))
            last = [pair for pair in pairs if pair[1] in self.indexes]
            for tmp, final in [pair for pair in pairs if pair[1] not in self.indexes] + last:
                os.replace(tmp, final)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporaries (the finals are untouched)."""
        for tmp in self.temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def __enter__(self) -> "AtomicFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


@contextlib.contextmanager
def atomic_path(path: PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary file path; on success move it to `path`, on error remove it.

        with atomic_path(out) as tmp:
            some_library.save(tmp)
    """
    with AtomicFiles([path], fsync=fsync) as files:
        yield files.temps[0]


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_jsonl(path: PathLike, records) -> int:
    """One JSON object a line; returns the number written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (removed first if present)."""
    final = Path(path)
    tmp = temporary_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = temporary_sibling(final, "old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # put the previous directory back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
