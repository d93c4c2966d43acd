"""Streaming reader/writer for Megatron-Core `torch_dist` checkpoints (PyTorch DCP files).

A torch_dist checkpoint is a PyTorch distributed-checkpoint folder: `__<rank>_<n>.distcp`
files holding one `torch.save` record per tensor chunk / object, a pickled `.metadata`
index (global shapes, chunk offsets, file offsets), plus Megatron's `metadata.json` and the
common (non-tensor) state. `dist_checkpointing.save` needs every tensor in memory at once;
this writer takes one chunk at a time and builds the same index, so an 8B model converts in
a few hundred MB. The reader fetches single chunks by file offset and never loads optimizer
entries. `.metadata` is unpickled with an allow-list (DCP's own dataclasses only); tensor
records go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from prolong_nemo.convert.mapping import ConversionError

METADATA_FILE = ".metadata"
MCORE_CONFIG_FILE = "metadata.json"
# The common (non-tensor) state is written twice: `common.pt`, which older megatron-core loads
# (and 0.19 still prefers when present, logging a deprecation), and the "common_state" object
# 0.19 writes and reads when there is no `common.pt`.
COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state"


def object_key(key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """Storage key of a Megatron ShardedObject (its `unique_key`)."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


# ---------------------------------------------------------------- safe metadata loading


_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # layout by name, e.g. "torch.strided"
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    # Dummy classes megatron-core pickles into older checkpoints' metadata.
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
}


def _is_dcp_data_class(value: Any, module: str) -> bool:
    """A dataclass or Enum defined in that DCP module (not a function, module or re-export)."""
    return (
        isinstance(value, type)
        and value.__module__ == module
        and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP metadata classes, torch.Size and torch dtype/layout constants."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        # No dotted names: protocol 4 resolves "os.system" as an attribute path from any module.
        if module.startswith(_ALLOWED_MODULE_PREFIXES) and "." not in name:
            value = super().find_class(module, name)
            if _is_dcp_data_class(value, module):
                return value
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


def load_metadata(directory: Path) -> Metadata:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise ConversionError(f"{directory}: no {METADATA_FILE} (not a torch_dist checkpoint folder)")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - refused globals, truncated or garbage files
            raise ConversionError(f"{path}: {e or type(e).__name__}") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path}: not a PyTorch distributed-checkpoint metadata file")
    return metadata


def _numpy_globals() -> list:
    """What a numpy array pickles to (megatron's RNG-state objects hold them): data, no code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *(getattr(np.dtypes, n) for n in np.dtypes.__all__)]


def _refusal(what: str, e: Exception) -> ConversionError:
    text = str(e).strip()
    return ConversionError(f"{what}: refusing to load (not plain tensors / data: "
                           f"{text.splitlines()[0] if text else type(e).__name__})")


def check_pickle_file(path: Path) -> None:
    """Refuse a `torch.save` file (common.pt, train_state.pt, ...) whose pickle holds anything
    but plain data: it is read with `torch.load(weights_only=True)`, which runs no code."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure: the file is not plain data
        raise _refusal(str(path), e) from None


def check_object_records(directory: Path, metadata: Metadata) -> None:
    """Refuse ShardedObject records (bytes in the .distcp files: RNG state, common state, TE
    extra state) that hold more than plain data: DCP's load planner unpickles them with
    `torch.load(weights_only=False)`. Checked with weights_only=True plus numpy arrays."""
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = Path(directory) / info.relative_path
        try:
            with open(path, "rb") as f, torch.serialization.safe_globals(_numpy_globals()):
                torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - missing file, garbage or a refused global
            raise _refusal(f"{path}: object {index.fqn}", e) from None


class _FileSlice(io.RawIOBase):
    """A read-only window [start, start+length) of an open file, for torch.load."""

    def __init__(self, f: io.BufferedReader, start: int, length: int):
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


# ---------------------------------------------------------------- raw record layout

_STORAGE_DTYPES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32}


@dataclass(frozen=True)
class RecordLayout:
    """Where a `torch.save`d contiguous tensor's bytes sit in its file."""

    data_offset: int  # absolute, in the .distcp file
    dtype: torch.dtype
    shape: tuple[int, ...]


class _TensorPickle(pickle.Unpickler):
    """Reads a one-tensor `data.pkl` into plain values; resolves nothing executable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _member_offset(f: io.BufferedReader, start: int, info: zipfile.ZipInfo) -> int | None:
    """Absolute offset of a stored zip member's data (read from its local header)."""
    f.seek(start + info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return start + info.header_offset + 30 + name_len + extra_len


def _member_bytes(f: io.BufferedReader, start: int, info: zipfile.ZipInfo) -> bytes:
    # Not ZipFile.read: records written without CRC32 (see _no_crc32) would fail its check.
    offset = _member_offset(f, start, info)
    if offset is None or info.file_size > 1 << 20:
        raise ValueError(info.filename)
    f.seek(offset)
    return f.read(info.file_size)


def record_layout(f: io.BufferedReader, start: int, length: int) -> RecordLayout | None:
    """The data position of a plain contiguous tensor record; None for anything else (then
    the caller falls back to `torch.load`, which handles every case)."""
    try:
        with zipfile.ZipFile(_FileSlice(f, start, length)) as zf:
            members = {i.filename: i for i in zf.infolist()}
        pkl = [name for name in members if name.endswith("/data.pkl")]
        if len(pkl) != 1:
            return None
        prefix = pkl[0][: -len("data.pkl")]
        if _member_bytes(f, start, members[prefix + "byteorder"]) != b"little":
            return None
        storage, offset, shape, stride = _TensorPickle(io.BytesIO(_member_bytes(f, start, members[pkl[0]]))).load()
        kind, dtype, key, _location, numel = storage
        data = members[f"{prefix}data/{key}"]
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError):
        return None
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    plain = kind == "storage" and offset == 0 and numel == torch.Size(shape).numel()
    if not plain or stride != _contiguous_strides(shape) or data.file_size != nbytes:
        return None
    data_offset = _member_offset(f, start, data)
    return None if data_offset is None else RecordLayout(data_offset, dtype, shape)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class StoredChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    info: _StorageInfo


class DistCheckpointReader:
    """Tensor access to a torch_dist folder, one stored chunk at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.metadata = load_metadata(self.directory)
        self._handles: dict[str, io.BufferedReader] = {}
        self._layouts: dict[tuple[str, int], RecordLayout | None] = {}

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def has(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), TensorStorageMetadata)

    def _tensor_meta(self, key: str) -> TensorStorageMetadata:
        meta = self.metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ConversionError(f"{self.directory}: tensor {key} is not in the checkpoint")
        return meta

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_meta(key).properties.dtype

    def _chunks(self, key: str) -> list[StoredChunk]:
        out = []
        for chunk in self._tensor_meta(key).chunks:
            info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
            if info is None:
                raise ConversionError(f"{self.directory}: tensor {key}: chunk at {tuple(chunk.offsets)} has no storage")
            if getattr(info, "transform_descriptors", None):
                raise ConversionError(f"{self.directory}: tensor {key}: stored with transforms {info.transform_descriptors}")
            out.append(StoredChunk(tuple(chunk.offsets), tuple(chunk.sizes), info))
        return out

    def _load_record(self, key: str, info: _StorageInfo) -> torch.Tensor:
        handle = self._handle(info.relative_path)
        try:
            value = torch.load(_FileSlice(handle, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt record: name it
            raise ConversionError(f"{self.directory / info.relative_path}: tensor {key}: unreadable record ({e})") from None
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{self.directory / info.relative_path}: tensor {key}: record is not a tensor")
        return value

    def _load_chunk(self, key: str, chunk: StoredChunk) -> torch.Tensor:
        record = self._load_record(key, chunk.info)
        if tuple(record.shape) != chunk.sizes or record.dtype != self.dtype(key):
            raise ConversionError(
                f"{self.directory}: tensor {key}: chunk at {chunk.offsets} holds {record.dtype} "
                f"{tuple(record.shape)}, metadata says {self.dtype(key)} {chunk.sizes}"
            )
        return record

    def read_region(self, key: str, start: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        """The region [start, start+size) of a global tensor, assembled from stored chunks."""
        chunks = self._chunks(key)
        whole = [c for c in chunks if all(o <= s and s + n <= o + m for s, n, o, m in zip(start, size, c.offsets, c.sizes))]
        if whole:  # one record holds the region: return a view of it, no second copy
            record = self._load_chunk(key, whole[0])
            return record[tuple(slice(s - o, s - o + n) for s, n, o in zip(start, size, whole[0].offsets))]
        out = torch.empty(size, dtype=self.dtype(key))
        covered = 0
        for chunk in chunks:
            lo = [max(a, b) for a, b in zip(start, chunk.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            record = self._load_chunk(key, chunk)
            src = record[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = src
            covered += src.numel()
            del record, src
        if covered != out.numel():
            raise ConversionError(f"{self.directory}: tensor {key}: stored chunks cover {covered} of {out.numel()} elements")
        return out

    def _handle(self, relative_path: str) -> io.BufferedReader:
        handle = self._handles.get(relative_path)
        if handle is None:
            path = self.directory / relative_path
            if not path.is_file():
                raise ConversionError(f"{self.directory}: file {relative_path} is missing")
            handle = self._handles[relative_path] = open(path, "rb")
        return handle

    def locate(self, key: str, start: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, int] | None:
        """(fd, byte offset) of a region stored contiguously in one record, for file-to-file
        copies; None when it spans records or is not contiguous there (use `read_region`)."""
        for chunk in self._chunks(key):
            rel = [s - o for s, o in zip(start, chunk.offsets)]
            if any(r < 0 or r + n > m for r, n, m in zip(rel, size, chunk.sizes)):
                continue
            # C-order sub-block is contiguous iff every axis after the first non-1 axis is full
            first = next((i for i, n in enumerate(size) if n != 1), len(size))
            if any(size[i] != chunk.sizes[i] for i in range(first + 1, len(size))):
                return None
            layout = self._layout(key, chunk)
            if layout is None:
                return None
            strides = _contiguous_strides(chunk.sizes)
            elem = sum(r * st for r, st in zip(rel, strides))
            return self._handle(chunk.info.relative_path).fileno(), layout.data_offset + elem * layout.dtype.itemsize
        return None

    def _layout(self, key: str, chunk: StoredChunk) -> RecordLayout | None:
        cache_key = (chunk.info.relative_path, chunk.info.offset)
        if cache_key not in self._layouts:
            layout = record_layout(self._handle(chunk.info.relative_path), chunk.info.offset, chunk.info.length)
            if layout is not None and (layout.shape != chunk.sizes or layout.dtype != self.dtype(key)):
                raise ConversionError(
                    f"{self.directory / chunk.info.relative_path}: tensor {key}: record holds "
                    f"{layout.dtype} {layout.shape}, metadata says {self.dtype(key)} {chunk.sizes}"
                )
            self._layouts[cache_key] = layout
        return self._layouts[cache_key]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def _no_crc32():
    """torch.save computes a zip CRC32 per record at ~0.4 GB/s, the slowest step of a write;
    torch.load does not need it (documented by `torch.serialization.set_crc32_options`)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _save(obj: Any, f) -> None:
    with _no_crc32():
        torch.save(obj, f)


def _record(obj: Any) -> bytes:
    buf = io.BytesIO()
    _save(obj, buf)
    return buf.getvalue()


class DistCheckpointWriter:
    """Appends tensor chunks and objects to `.distcp` files; `finish` writes the index."""

    def __init__(self, directory: Path, fsync: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self.fsync = fsync
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: set[str] = set()
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._file: io.BufferedWriter | None = None
        self._file_name = ""
        self._file_count = 0

    def new_file(self) -> None:
        """Start the next `.distcp` file (e.g. one per layer); purely an on-disk grouping."""
        self._close_file()
        self._file_name = f"__0_{self._file_count}.distcp"
        self._file_count += 1
        self._file = open(self.directory / self._file_name, "wb")

    def _close_file(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def _append(self, write) -> _StorageInfo:
        if self._file is None:
            self.new_file()
        start = self._file.tell()
        write(self._file)
        return _StorageInfo(self._file_name, start, self._file.tell() - start)

    def add_chunk(self, key: str, tensor: torch.Tensor, global_shape: tuple[int, ...], offset: tuple[int, ...]) -> None:
        """Store `tensor` (full rank, e.g. [1, rows, cols] for layer i) at `offset` of `key`."""
        if tensor.dim() != len(global_shape) or len(offset) != len(global_shape):
            raise ConversionError(f"tensor {key}: chunk rank {tensor.dim()} != global rank {len(global_shape)}")
        if any(o + n > g for o, n, g in zip(offset, tensor.shape, global_shape)):
            raise ConversionError(f"tensor {key}: chunk {tuple(tensor.shape)} at {offset} exceeds {global_shape}")
        meta = self._tensors.get(key)
        if meta is None:
            meta = self._tensors[key] = TensorStorageMetadata(
                TensorProperties(dtype=tensor.dtype), torch.Size(global_shape), []
            )
        elif meta.properties.dtype != tensor.dtype or tuple(meta.size) != tuple(global_shape):
            raise ConversionError(f"tensor {key}: chunk dtype/shape disagree with earlier chunks")
        # torch.save stores a view's whole storage: hand it an exact, contiguous tensor.
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        info = self._append(lambda f: _save(tensor, f))
        offsets = torch.Size(offset)
        meta.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(tensor.shape)))
        self._storage[MetadataIndex(key, offsets)] = info

    def add_object(self, unique_key: str, data: Any) -> None:
        """A Megatron ShardedObject: DCP stores `torch.save([data])` as bytes."""
        if unique_key in self._objects:
            raise ConversionError(f"object {unique_key} written twice")
        payload = _record([data])
        info = self._append(lambda f: f.write(payload))
        self._objects.add(unique_key)
        self._storage[MetadataIndex(unique_key)] = info

    def _check_coverage(self) -> None:
        for key, meta in self._tensors.items():
            total = sum(torch.Size(c.sizes).numel() for c in meta.chunks)
            if total != meta.size.numel():
                raise ConversionError(f"tensor {key}: chunks cover {total} of {meta.size.numel()} elements")

    def finish(self, common_state: dict[str, Any]) -> None:
        """Common state, `.metadata`, then Megatron's `metadata.json` (written last, as upstream)."""
        self.add_object(object_key(COMMON_STATE_KEY, (0,), (1,)), common_state)
        self._close_file()
        self._check_coverage()
        state_dict_metadata: dict[str, Any] = dict(self._tensors)
        state_dict_metadata.update({k: BytesStorageMetadata() for k in self._objects})
        metadata = Metadata(
            state_dict_metadata=state_dict_metadata,
            storage_data=self._storage,
            storage_meta=StorageMeta(checkpoint_id=None),
        )
        self._write_file(METADATA_FILE, pickle.dumps(metadata))
        self._write_file(COMMON_FILE, _record(common_state))
        config = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
        self._write_file(MCORE_CONFIG_FILE, json.dumps(config).encode())

    def _write_file(self, name: str, payload: bytes) -> None:
        with open(self.directory / name, "wb") as f:
            f.write(payload)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
