"""Streaming safetensors: read one tensor at a time with plain reads, write shards header-first.

Why not `safetensors.safe_open`: it memory-maps the file, and every page of a mapped shard a
conversion touches counts in the process RSS (a 5 GB shard would blow the 4 GB budget).
Why not `save_file`: it needs a whole shard in memory. The format is simple (8-byte header
length, JSON header, raw little-endian bytes), so both directions stream here; files written
here are checked by the `safetensors` library itself in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from prolong_nemo.convert.mapping import DTYPES, ConversionError

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HEADER_LIMIT = 100 * 1024 * 1024  # same bound as the safetensors library


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, StoredTensor]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: truncated safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > _HEADER_LIMIT:
            raise ConversionError(f"{path}: safetensors header of {size} bytes is implausible")
        header = json.loads(f.read(size))
        file_size = os.fstat(f.fileno()).st_size
    base = 8 + size
    out: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != nbytes or base + end > file_size:
            raise ConversionError(f"{path}: tensor {name} has inconsistent offsets (truncated file?)")
        out[name] = StoredTensor(path, name, dtype, shape, base + begin, nbytes)
    return out


class SafetensorsFolder:
    """Read access to the weights of a HF folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors: dict[str, StoredTensor] = {}
        for path in self._files():
            for name, stored in _read_header(path).items():
                if name in self.tensors:
                    raise ConversionError(f"{path}: tensor {name} also stored in {self.tensors[name].file}")
                self.tensors[name] = stored
        self._handles: dict[Path, BinaryIO] = {}

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return sorted({self.folder / name for name in weight_map.values()})
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return [single]
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        pickled = [p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {pickled}: pickle-based weights are never loaded, convert them to safetensors)" if pickled else ""
        raise ConversionError(f"{self.folder}: no safetensors weights{hint}")

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor read with plain file reads (no mapping)."""
        stored = self.tensors.get(name)
        if stored is None:
            raise ConversionError(f"{self.folder}: tensor {name} is missing from the safetensors files")
        out = torch.empty(stored.shape, dtype=stored.dtype)
        handle = self._handles.get(stored.file)
        if handle is None:
            handle = self._handles[stored.file] = open(stored.file, "rb", buffering=0)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        handle.seek(stored.start)
        got = handle.readinto(view) if stored.nbytes else 0
        if got != stored.nbytes:
            raise ConversionError(f"{stored.file}: tensor {name}: short read ({got} of {stored.nbytes} bytes)")
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most max_shard_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file whose tensors arrive one by one, in planned order."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], fsync: bool = True):
        self.path, self.fsync = Path(path), fsync
        self._pending = list(tensors)
        self._file = open(self.path, "wb")
        self._file.write(_header_bytes(tensors, {"format": "pt"}))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._pending:
            raise ConversionError(f"{self.path}: unexpected extra tensor {name}")
        want = self._pending.pop(0)
        if want.name != name or want.dtype != tensor.dtype or want.shape != tuple(tensor.shape):
            raise ConversionError(
                f"{self.path}: tensor {name} {tensor.dtype} {tuple(tensor.shape)} arrived where "
                f"{want.name} {want.dtype} {want.shape} was planned"
            )
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self._file.write(memoryview(data))

    def close(self) -> None:
        if self._pending:
            raise ConversionError(f"{self.path}: {len(self._pending)} planned tensors never written")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file.close()


def write_index(folder: Path, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    if len(names) == 1:
        return
    weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    with open(Path(folder) / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
