"""Streaming safetensors I/O: read and write one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, offsets relative to
the end of the header) and the raw little-endian tensor bytes. We read and write it ourselves
(with plain file reads, no mmap) so that the memory held at any moment is one tensor: an mmap of
a 4 GB shard would count towards the process's resident set as its pages are touched, and
`safetensors.torch.save_file` needs the whole shard in memory. Files written here are read back
by the `safetensors` library and by `transformers` in the tests.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_diffu.common.atomic import AtomicFiles

# safetensors dtype codes <-> torch dtypes (the subset language models use)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""
    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
        header = json.loads(f.read(n))
    return header, 8 + n


def read_safetensors_index(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header into `{name: TensorInfo}` (no tensor data is read)."""
    header, data_start = _read_header(path)
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        b, e = meta["data_offsets"]
        out[name] = TensorInfo(name, path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), data_start + b, data_start + e)
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor from disk into fresh memory (exactly its size, no mmap)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(memoryview(buf.numpy()))
    if got != info.nbytes:
        raise ValueError(f"{info.path}: truncated file, tensor {info.name!r} needs {info.nbytes} bytes, got {got}")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return buf.view(info.dtype).reshape(info.shape)


class SafetensorsFolder:
    """The tensors of a Hugging Face folder: `model.safetensors` or shards listed in the index.

    Raises FileNotFoundError naming the missing shard file when the index lists a file that is
    not in the folder, and ValueError when the index points a tensor at a file without it.
    """

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        index = self.folder / INDEX_NAME
        if index.exists():
            self._load_index(index)
        elif (self.folder / SINGLE_NAME).exists():
            self.tensors = read_safetensors_index(self.folder / SINGLE_NAME)
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.folder}: no {SINGLE_NAME}, no {INDEX_NAME} and no *.safetensors file; "
                    f"convert .bin checkpoints to safetensors first")
            for f in files:
                self.tensors.update(read_safetensors_index(f))

    def _load_index(self, index: Path) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (self.folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard file(s) missing from {self.folder}: {missing} "
                f"(download them again or fix the index)")
        per_file = {f: read_safetensors_index(self.folder / f) for f in files}
        for name, f in weight_map.items():
            if name not in per_file[f]:
                raise ValueError(f"{index}: tensor {name!r} is mapped to {f} but that file does not contain it")
            self.tensors[name] = per_file[f][name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.folder}: tensor {name!r} not found in the checkpoint")
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.info(name))

    @property
    def largest_file_bytes(self) -> int:
        return max((os.path.getsize(p) for p in {t.path for t in self.tensors.values()}), default=0)


# ---------------------------------------------------------------------------------- writing
def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict = {"__metadata__": metadata}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw, sizes


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class StreamingSafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front, one tensor at a time.

    The header (names, dtypes, shapes, offsets) is written first; `write(name, tensor)` must then
    be called in the declared order. The file is written to a temporary name and moved into place
    (fsync'ed) on `close()` (`common.atomic.AtomicFiles`), so a crash never leaves a truncated file
    under the final name.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.entries = entries
        self._file = AtomicFiles([self.path], fsync=True)
        header, self._sizes = _header_bytes(entries, {"format": "pt", **(metadata or {})})
        self._f = open(self._file.temps[0], "wb")
        self._f.write(header)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.entries[self._next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected tensor #{self._next} {exp_name} {dtype} {tuple(shape)}, "
                             f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        self._f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            self.abort()
            raise ValueError(f"{self.path}: only {self._next} of {len(self.entries)} tensors were written")
        self._f.close()
        self._file.commit()

    def abort(self) -> None:
        self._f.close()
        self._file.abort()


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Greedily group consecutive entries into shards of at most `max_shard_bytes` (a bigger
    single tensor gets a shard of its own), keeping order."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

