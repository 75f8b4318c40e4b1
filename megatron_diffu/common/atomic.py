"""The one way this package writes an output: to a temporary name beside it, then `os.replace`.

A reader (or a crash) sees either the previous file or the complete new one, never a half-written
one. Directories get the same treatment with `atomic_dir` (an existing directory of that name is
replaced only after the new one is complete).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def temporary_sibling(path: PathLike, tag: str = "tmp") -> Path:
    """`<name>.<tag>-<pid>` in the same directory (same filesystem, so `os.replace` is atomic)."""
    p = Path(path)
    return p.with_name(f"{p.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary file path; on success move it to `path`, on error remove it.

        with atomic_path(out) as tmp:
            some_library.save(tmp)
    """
    final = Path(path)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if fsync and tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
