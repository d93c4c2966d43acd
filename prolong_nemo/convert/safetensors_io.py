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

    def stored(self, name: str) -> StoredTensor:
        stored = self.tensors.get(name)
        if stored is None:
            raise ConversionError(f"{self.folder}: tensor {name} is missing from the safetensors files")
        return stored

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor read with plain file reads (no mapping)."""
        stored = self.stored(name)
        out = torch.empty(stored.shape, dtype=stored.dtype)
        self.read_rows_into(name, 0, stored.shape[0] if stored.shape else 1, out)
        return out

    def read_rows_into(self, name: str, first: int, count: int, out: torch.Tensor) -> None:
        """Rows [first, first+count) of a stored tensor, read straight into contiguous `out`."""
        stored = self.stored(name)
        row_bytes = stored.nbytes // max(stored.shape[0], 1) if stored.shape else stored.nbytes
        nbytes = count * row_bytes
        if out.dtype != stored.dtype or out.nbytes != nbytes or not out.is_contiguous():
            raise ConversionError(f"{stored.file}: tensor {name}: destination does not match {count} rows")
        if nbytes == 0:
            return
        handle = self._handles.get(stored.file)
        if handle is None:
            handle = self._handles[stored.file] = open(stored.file, "rb", buffering=0)
        got = pread_full(handle.fileno(), out, stored.start + first * row_bytes)
        if got != nbytes:
            raise ConversionError(f"{stored.file}: tensor {name}: short read ({got} of {nbytes} bytes)")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


# ---------------------------------------------------------------- byte movement


def pread_full(fd: int, out: torch.Tensor, offset: int) -> int:
    """Fill contiguous `out` from `fd` at `offset`; returns the bytes read (short at EOF)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """File-to-file copy inside the kernel (what `cp` does); a read/write loop if unsupported."""
    done = 0
    try:
        while done < nbytes:
            got = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
            if got <= 0:
                break
            done += got
    except OSError:
        pass
    while done < nbytes:  # fallback, and the remainder of a short kernel copy
        chunk = os.pread(src_fd, min(nbytes - done, 16 << 20), src_offset + done)
        if not chunk:
            raise ConversionError(f"short read copying {nbytes} bytes from fd {src_fd} at {src_offset}")
        done += os.pwrite(dst_fd, chunk, dst_offset + done)


class Arena:
    """One reusable buffer for the tensor in flight.

    A fresh multi-GB allocation costs its first-touch page faults on every tensor (about 1 GB/s
    on a small VM, slower than the disk); reusing one buffer pays that once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over the buffer (valid until the next call), its storage exactly its size."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if len(self._buf) < nbytes:
            self._buf = bytearray(nbytes)
        return torch.frombuffer(memoryview(self._buf)[:nbytes], dtype=torch.uint8).view(dtype).view(shape)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(groups: Iterable[list[PlannedTensor]], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive shards of at most max_shard_bytes; a group (the HF tensors of one Megatron
    tensor) is never split, and a bigger group gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
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
    """One safetensors file: header first, then tensor bytes at their planned offsets, in any
    order (whole tensors from memory, or row ranges copied file-to-file)."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], fsync: bool = True):
        self.path, self.fsync = Path(path), fsync
        header = _header_bytes(tensors, {"format": "pt"})
        self._planned = {t.name: t for t in tensors}
        self._offsets, pos = {}, len(header)
        for t in tensors:
            self._offsets[t.name], pos = pos, pos + t.nbytes
        self._written = dict.fromkeys(self._planned, 0)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, header, 0)

    def _claim(self, name: str, start: int, nbytes: int) -> int:
        want = self._planned.get(name)
        if want is None:
            raise ConversionError(f"{self.path}: unexpected tensor {name}")
        if start < 0 or start + nbytes > want.nbytes:
            raise ConversionError(f"{self.path}: tensor {name}: bytes [{start}, {start + nbytes}) outside its {want.nbytes}")
        self._written[name] += nbytes
        return self._offsets[name] + start

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._planned.get(name)
        if want is None or want.dtype != tensor.dtype or want.shape != tuple(tensor.shape):
            raise ConversionError(f"{self.path}: tensor {name} {tensor.dtype} {tuple(tensor.shape)} was not planned as such")
        self.write_at(name, 0, tensor)

    def write_at(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """The bytes of `tensor` as bytes [start, ...) of tensor `name`."""
        if tensor.dtype != self._planned[name].dtype:
            raise ConversionError(f"{self.path}: tensor {name}: {tensor.dtype} bytes for a {self._planned[name].dtype} tensor")
        data = memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
        pos, done = self._claim(name, start, len(data)), 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], pos + done)

    def copy_rows(self, name: str, start: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Bytes [start, start+nbytes) of tensor `name`, copied from another file."""
        copy_range(src_fd, src_offset, self._fd, self._claim(name, start, nbytes), nbytes)

    def close(self) -> None:
        incomplete = [n for n, t in self._planned.items() if self._written[n] != t.nbytes]
        if incomplete:
            os.close(self._fd)
            raise ConversionError(f"{self.path}: tensors not completely written: {incomplete[:3]}")
        if self.fsync:
            os.fsync(self._fd)
        os.close(self._fd)


def write_index(folder: Path, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    if len(names) == 1:
        return
    weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    with open(Path(folder) / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
