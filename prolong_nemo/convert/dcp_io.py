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

import io
import json
import os
import pickle
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
COMMON_FILE = "common.pt"  # read by megatron-core <= 0.18; 0.19 also finds "common_state"
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


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP metadata classes, torch.Size and torch dtype/layout constants."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or module.startswith(_ALLOWED_MODULE_PREFIXES):
            return super().find_class(module, name)
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
        except pickle.UnpicklingError as e:
            raise ConversionError(f"{path}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path}: not a PyTorch distributed-checkpoint metadata file")
    return metadata


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
        handle = self._handles.get(info.relative_path)
        if handle is None:
            path = self.directory / info.relative_path
            if not path.is_file():
                raise ConversionError(f"{self.directory}: tensor {key}: file {info.relative_path} is missing")
            handle = self._handles[info.relative_path] = open(path, "rb")
        try:
            value = torch.load(_FileSlice(handle, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt record: name it
            raise ConversionError(f"{self.directory / info.relative_path}: tensor {key}: unreadable record ({e})") from None
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{self.directory / info.relative_path}: tensor {key}: record is not a tensor")
        return value

    def read_region(self, key: str, start: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        """The region [start, start+size) of a global tensor, assembled from stored chunks."""
        out = torch.empty(size, dtype=self.dtype(key))
        covered = 0
        for chunk in self._chunks(key):
            lo = [max(a, b) for a, b in zip(start, chunk.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            record = self._load_record(key, chunk.info)
            if tuple(record.shape) != chunk.sizes:
                raise ConversionError(
                    f"{self.directory}: tensor {key}: chunk at {chunk.offsets} holds shape "
                    f"{tuple(record.shape)}, metadata says {chunk.sizes}"
                )
            src = record[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = src
            covered += src.numel()
            del record, src
        if covered != out.numel():
            raise ConversionError(f"{self.directory}: tensor {key}: stored chunks cover {covered} of {out.numel()} elements")
        return out

    def read_object(self, unique_key: str) -> bytes:
        info = self.metadata.storage_data.get(MetadataIndex(unique_key))
        if info is None:
            raise ConversionError(f"{self.directory}: object {unique_key} is not in the checkpoint")
        with open(self.directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


# ---------------------------------------------------------------- writing


def _record(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
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
        info = self._append(lambda f: torch.save(tensor, f))
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
