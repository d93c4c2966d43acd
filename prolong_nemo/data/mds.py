"""Read and validate one ProLong MDS domain folder through mosaicml-streaming's shard readers.

We use streaming's own ``MDSReader`` (index.json parsing, sample decoding) and its
``CloudDownloader`` (remote object stores into a local cache), but not ``StreamingDataset``:
Megatron needs plain random access by sample index on every rank, with no shared-memory
coordination or epoch state of its own. Every sample is validated when read, and any problem is
an error that names the folder, the shard and the sample: nothing is skipped or trained on silently.
"""

from __future__ import annotations

import bisect
import json
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from streaming.base.format import reader_from_json
from streaming.base.format.mds.reader import MDSReader
from streaming.base.hashing import get_hash, is_hash
from streaming.base.storage.download import CloudDownloader

from prolong_nemo.data.mixture import is_remote  # noqa: F401 - re-exported: mds.is_remote
from prolong_nemo.errors import DataError

LLAMA3_VOCAB_SIZE = 128256
INDEX_FILE = "index.json"
REQUIRED_COLUMNS = ("input_ids",)
INTEGER_ARRAY = "ndarray:"  # column encodings look like "ndarray:uint32"
# The only column encodings decoded: our writers' (PACKED_COLUMNS, MASK_COLUMN, tokenize's RAW_COLUMNS).
# Anything else (``pkl`` runs code when decoded; images go through PIL) is refused before any read.
SAFE_ENCODINGS = ("int", "str")


@dataclass(frozen=True)
class Sample:
    """One validated MDS sample."""

    input_ids: np.ndarray  # 1-D integer token ids
    indices: np.ndarray | None  # (n_docs, 2) [start, end) or None: one document
    mask: np.ndarray | None  # 1-D uint8 instruction mask or None
    domain: str | None


class MdsDomain:
    """Random, validated access to the samples of one MDS domain folder (local or remote)."""

    def __init__(self, path: str, *, cache_dir: str | None = None, vocab_size: int = LLAMA3_VOCAB_SIZE,
                 download_timeout: float = 600.0) -> None:
        self.path = path.rstrip("/")
        self.vocab_size = vocab_size
        self.download_timeout = download_timeout
        if is_remote(self.path):
            if not cache_dir:
                raise DataError(f"{self.path}: a remote domain needs a local cache_dir")
            self.local = os.path.join(cache_dir, _cache_name(self.path))
            if not _inside(self.local, cache_dir):
                raise DataError(f"{self.path}: the cache folder {self.local} would leave cache_dir {cache_dir}")
        else:
            self.local = self.path
            if not os.path.isdir(self.path):
                raise DataError(f"{self.path}: domain folder does not exist")
        self.shards = self._load_shards()
        self._verified: set[int] = set()
        self._offsets = np.concatenate([[0], np.cumsum([s.samples for s in self.shards])]).tolist()
        if self.num_samples == 0:
            raise DataError(f"{self.path}: domain is empty (index.json lists no samples)")

    # ---- index -----------------------------------------------------------------------------
    def _load_shards(self) -> list[MDSReader]:
        index = os.path.join(self.local, INDEX_FILE)
        self._fetch(INDEX_FILE)
        if not os.path.isfile(index):
            hint = " (shards in sub-folders? merge their indexes with streaming.base.util.merge_index)"
            raise DataError(f"{self.path}: no {INDEX_FILE}{hint if os.path.isdir(self.local) else ''}")
        try:
            with open(index) as f:
                obj = json.load(f)
            infos = obj["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index}: invalid MDS index ({e.__class__.__name__}: {e})") from None
        readers = [self._reader(info, i) for i, info in enumerate(infos)]
        check_shard_entries(index, readers, self.local, self.path)
        return readers

    def _reader(self, info: dict, shard_id: int) -> MDSReader:
        where = f"{self.path}: shard #{shard_id}"
        try:
            reader = reader_from_json(self.local, None, info)
            where = f"{self.path}/{reader.raw_data.basename}"
        except Exception as e:  # streaming raises ValueError / KeyError / TypeError on bad entries
            raise DataError(f"{where}: invalid shard entry in {INDEX_FILE} ({e})") from None
        if not isinstance(reader, MDSReader):
            raise DataError(f"{where}: not an MDS shard (format {info.get('format')!r})")
        if reader.compression:
            raise DataError(f"{where}: compressed shards ({reader.compression}) are not supported; "
                            "ProLong data is uncompressed")
        encodings = dict(zip(reader.column_names, reader.column_encodings))
        for name in REQUIRED_COLUMNS:
            if name not in encodings:
                raise DataError(f"{where}: missing column {name!r} (columns: {sorted(encodings)})")
        for name in ("input_ids", "indices", "mask"):
            enc = encodings.get(name)
            if enc is not None and not _is_integer_array(enc):
                raise DataError(f"{where}: column {name!r} has encoding {enc!r}; expected an integer ndarray "
                                "(ndarray:uint32 for input_ids/indices, ndarray:uint8 for mask)")
        return reader

    @property
    def num_samples(self) -> int:
        return self._offsets[-1]

    def __len__(self) -> int:
        return self.num_samples

    @cached_property
    def columns(self) -> set[str]:
        return set().union(*(s.column_names for s in self.shards))

    def locate(self, idx: int) -> tuple[MDSReader, int]:
        shard_id = self._shard_id(idx)
        return self.shards[shard_id], idx - self._offsets[shard_id]

    def _shard_id(self, idx: int) -> int:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"{self.path}: sample {idx} out of range [0, {self.num_samples})")
        return bisect.bisect_right(self._offsets, idx) - 1

    def _verify(self, shard_id: int) -> None:
        """Once per shard, before its first sample is decoded: the file is the one index.json describes."""
        if shard_id in self._verified:
            return
        reader = self.shards[shard_id]
        filename = os.path.join(self.local, reader.raw_data.basename)
        if not os.path.isfile(filename):
            return  # reported by the read, naming the sample
        where = f"{self.path}/{reader.raw_data.basename}"
        size = os.path.getsize(filename)
        if size != reader.raw_data.bytes:
            raise DataError(f"{where}: file has {size} bytes but {INDEX_FILE} lists {reader.raw_data.bytes} "
                            "(truncated, appended to or replaced)")
        with open(filename, "rb") as f:
            data = f.read() if reader.raw_data.hashes else f.read(4)
        held = int(np.frombuffer(data[:4], np.uint32)[0]) if len(data) >= 4 else 0
        if held != reader.samples:
            raise DataError(f"{where}: holds {held} samples but {INDEX_FILE} lists {reader.samples}")
        for algo, expected in (reader.raw_data.hashes or {}).items():
            if not is_hash(algo):
                raise DataError(f"{where}: {INDEX_FILE} lists a hash of unknown algorithm {algo!r}")
            actual = get_hash(algo, data)
            if actual != expected:
                raise DataError(f"{where}: {algo} {actual} does not match {INDEX_FILE}'s {expected} (corrupted shard)")
        self._verified.add(shard_id)

    # ---- samples ---------------------------------------------------------------------------
    def __getitem__(self, idx: int) -> Sample:
        shard_id = self._shard_id(int(idx))
        reader, local_idx = self.shards[shard_id], int(idx) - self._offsets[shard_id]
        where = f"{self.path}/{reader.raw_data.basename}: sample {local_idx} (domain sample {idx})"
        self._fetch(reader.raw_data.basename)
        self._verify(shard_id)
        try:
            raw = reader.get_item(local_idx)
        except Exception as e:
            raise DataError(f"{where}: cannot decode ({e.__class__.__name__}: {e})") from None
        return validate_sample(raw, where, self.vocab_size)

    def _fetch(self, relative: str) -> None:
        """Bring a remote file into the local cache (atomic rename: safe with many ranks)."""
        if self.local == self.path:
            return
        target = os.path.join(self.local, relative)
        if os.path.isfile(target):
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp.{os.getpid()}"
        remote = f"{self.path}/{relative}"
        try:
            CloudDownloader.get(remote).download(remote, tmp, self.download_timeout)
        except Exception as e:
            raise DataError(f"{remote}: download failed ({e.__class__.__name__}: {e})") from None
        os.replace(tmp, target)


def check_shard_entries(index: str, readers: Sequence[MDSReader], local: str, path: str) -> None:
    """Before any shard is read or downloaded: every shard file lies inside the domain folder
    `local` (for a remote domain, its cache), is listed once, and has only column encodings
    that decode without unpickling (`pkl` would run code from the data)."""
    seen: dict[str, str] = {}
    for reader in readers:
        basename = reader.raw_data.basename
        if not isinstance(basename, str) or not basename:
            raise DataError(f"{index}: shard basename {basename!r} is not a file name")
        if os.path.isabs(basename) or urllib.parse.urlparse(basename).scheme:
            raise DataError(f"{index}: shard basename {basename!r} is absolute; shards must lie in the domain folder")
        if not _inside(os.path.join(local, basename), local):
            raise DataError(f"{index}: shard basename {basename!r} points outside the domain folder {path}")
        key = os.path.normpath(basename)
        if key in seen:
            raise DataError(f"{index}: shard basename {basename!r} is listed twice (first as {seen[key]!r}): "
                            "its samples would be read twice")
        seen[key] = basename
        for name, enc in zip(reader.column_names, reader.column_encodings):
            if not (enc in SAFE_ENCODINGS or enc == "ndarray" or str(enc).startswith(INTEGER_ARRAY)):
                raise DataError(f"{index}: shard {basename}: column {name!r} has encoding {enc!r}; "
                                f"only ndarray, {', '.join(SAFE_ENCODINGS)} columns are read (ProLong's format)")


def check_local_index(folder: str) -> None:
    """`check_shard_entries` for a local MDS folder of any column layout (e.g. raw documents)."""
    index = os.path.join(folder, INDEX_FILE)
    try:
        with open(index) as f:
            infos = json.load(f)["shards"]
        readers = [reader_from_json(folder, None, info) for info in infos]
    except Exception as e:  # streaming raises ValueError / KeyError / TypeError on bad entries
        raise DataError(f"{index}: invalid MDS index ({e.__class__.__name__}: {e})") from None
    check_shard_entries(index, readers, folder, folder)


def validate_sample(raw: dict, where: str, vocab_size: int) -> Sample:
    """Check one decoded sample against the published format; raise DataError naming it."""
    ids = raw.get("input_ids")
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"{where}: input_ids must be a 1-D integer array, got {_describe(ids)}")
    n = len(ids)
    if n == 0:
        raise DataError(f"{where}: empty sample (no input_ids)")
    if ids.dtype.kind == "i" and ids.min() < 0 or int(ids.max()) >= vocab_size:
        bad = int(np.flatnonzero((ids.astype(np.int64) < 0) | (ids.astype(np.int64) >= vocab_size))[0])
        raise DataError(f"{where}: token id {int(ids[bad])} at position {bad} is outside the vocabulary "
                        f"[0, {vocab_size})")
    if "length" in raw and raw["length"] is not None and int(raw["length"]) != n:
        raise DataError(f"{where}: length {int(raw['length'])} disagrees with len(input_ids) {n}")
    indices = _validate_indices(raw.get("indices"), n, where)
    mask = raw.get("mask")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.ndim != 1 or mask.dtype.kind not in "iub":
            raise DataError(f"{where}: mask must be a 1-D integer array, got {_describe(mask)}")
        if len(mask) != n:
            raise DataError(f"{where}: mask has {len(mask)} entries but input_ids has {n}")
    domain = raw.get("domain")
    return Sample(ids, indices, mask, domain if isinstance(domain, str) else None)


def _validate_indices(indices, n: int, where: str) -> np.ndarray | None:
    if indices is None:
        return None
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
        raise DataError(f"{where}: indices must be an integer array, got {_describe(indices)}")
    if indices.size == 0:
        return None
    if indices.ndim != 2 or indices.shape[1] != 2:
        raise DataError(f"{where}: indices must have shape (n_docs, 2), got {indices.shape}")
    idx = indices.astype(np.int64)
    starts, ends = idx[:, 0], idx[:, 1]
    bad = np.flatnonzero((starts < 0) | (ends > n) | (starts > ends))
    if len(bad):
        a, b = idx[bad[0]]
        raise DataError(f"{where}: document {bad[0]} [{a}, {b}) is out of range for {n} tokens")
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if len(bad):
        i = int(bad[0]) + 1
        raise DataError(f"{where}: documents {i - 1} and {i} are unsorted or overlap "
                        f"([{starts[i - 1]}, {ends[i - 1]}) then [{starts[i]}, {ends[i]}))")
    return idx


def _is_integer_array(encoding: str) -> bool:
    if encoding == "ndarray":  # dtype stored per sample: checked when the sample is read
        return True
    if not encoding.startswith(INTEGER_ARRAY):
        return False
    dtype = encoding[len(INTEGER_ARRAY):].split(":")[0]
    try:
        return np.dtype(dtype).kind in "iu"
    except TypeError:
        return False


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array of {value.dtype} with shape {value.shape}"
    return type(value).__name__


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` resolves (``..`` and symlinks) to a file or folder below ``folder``."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _cache_name(remote: str) -> str:
    parsed = urllib.parse.urlparse(remote)
    return os.path.join(parsed.scheme, parsed.netloc, parsed.path.lstrip("/"))


# The published ProLong packed format (the princeton-nlp/prolong-data-64K and -512K datasets on the HF Hub).
PACKED_COLUMNS = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "length": "int", "domain": "str"}
MASK_COLUMN = {"mask": "ndarray:uint8"}
SHARD_SIZE_LIMIT = 1 << 26  # 64 MiB, as in the published shards


def prepare_output_dir(out_dir, overwrite: bool) -> None:
    """An empty output folder: refuse to mix with existing data unless told to replace it."""
    import shutil
    from pathlib import Path

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (use --overwrite)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_domain(folder: str, samples, *, with_mask: bool = False, columns: dict[str, str] | None = None,
                 size_limit: int = SHARD_SIZE_LIMIT) -> int:
    """Write samples (dicts of the packed columns) as one MDS domain folder; returns the count."""
    from streaming import MDSWriter

    columns = dict(columns or PACKED_COLUMNS) | (MASK_COLUMN if with_mask else {})
    count = 0
    with MDSWriter(out=folder, columns=columns, size_limit=size_limit) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count


# ---- a sample's document bounds without decoding its tokens (the balancer, plan's length statistics)
def mds_document_bounds(domain, idx: int) -> tuple[int, np.ndarray | None]:
    """(token count, (n_docs, 2) document indices or None) of MDS sample ``idx`` of ``domain``
    (an ``MdsDomain``), reading only the ``length`` and ``indices`` columns of the shard.

    Anything unexpected (a shard not in the local cache yet, no ``length`` column, a malformed
    sample) falls back to the full, validated read, which names the problem if there is one.
    """
    reader, local_idx = domain.locate(int(idx))
    filename = os.path.join(domain.local, reader.raw_data.basename)
    columns = list(zip(reader.column_names, reader.column_encodings, reader.column_sizes))
    if "length" in reader.column_names and os.path.isfile(filename):
        try:
            with open(filename, "rb", buffering=0) as f:
                bounds = _read_columns(f.fileno(), local_idx, columns)
        except (OSError, ValueError):
            bounds = None
        if bounds is not None:
            return bounds
    sample = domain[int(idx)]
    return len(sample.input_ids), sample.indices


def _read_columns(fd: int, local_idx: int, columns) -> tuple[int, np.ndarray | None] | None:
    """The sample's ``length`` and ``indices`` (if the shard has them) by MDS's layout: a uint32
    offset table after the sample count, then per sample the uint32 sizes of its variable-size
    columns and the columns' bytes in order. None when the bytes do not look like that."""
    from streaming.base.format.mds.encodings import mds_decode

    begin, end = (int(x) for x in np.frombuffer(os.pread(fd, 8, 4 * (1 + local_idx)), np.uint32))
    n_variable = sum(size is None for _, _, size in columns)
    header = np.frombuffer(os.pread(fd, 4 * n_variable, begin), np.uint32).tolist()
    if len(header) != n_variable:
        return None
    position, values, variable = begin + 4 * n_variable, {}, iter(header)
    for name, encoding, size in columns:
        size = next(variable) if size is None else size
        if name in ("indices", "length"):
            data = os.pread(fd, size, position)
            if len(data) != size:
                return None
            values[name] = mds_decode(encoding, data)
        position += size
    if position != end:
        return None
    n, indices = int(values["length"]), np.asarray(values.get("indices", np.zeros((0, 2))))
    if indices.size == 0:
        return n, None
    if indices.ndim != 2 or indices.shape[1] != 2 or indices.min() < 0 or indices.max() > n:
        return None
    return n, indices.astype(np.int64)
