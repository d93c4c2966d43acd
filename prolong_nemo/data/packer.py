"""Pack raw MDS documents into ProLong-format fixed-length samples (input_ids, indices, length, domain, mask).

Reproduces the reference ProLong packer (datatools `pack`, github.com/CodeCreator/datatools, which
ProLong's README names) for the options ProLong used:

* documents (optionally wrapped in BOS/EOS) are appended to a buffer; once the buffer holds at
  least ``pack_length`` tokens, exactly ``pack_length`` tokens are emitted with ``indices`` (the
  [start, end) offset of every segment) clipped at ``pack_length``;
* the overflowing tail of the last document is carried into the next sample as its own segment
  (prefixed by the optional "middle-of-sequence" token) if it has at least ``min_length`` tokens,
  otherwise it is dropped;
* the final partial buffer of each output subset is never emitted;
* with ``split_lengths`` (e.g. 524288 and 65536) every document is first cut into the longest
  fitting chunks, and chunks of each length are packed into their own subset folder
  ``<chunk>-<pack_length>`` (the reference's naming); a remainder shorter than the smallest
  chunk length is dropped.

The ``domain`` column holds ``--domain`` when given, else the subset path (the reference's rule,
e.g. "book/65536-524288"), else (no subsets, where the reference writes ".") the domain of the
sample's first document. Packing is sequential, i.e. the reference run with one process.

Deliberate differences from the reference, none of which changes a packed token: empty documents
are skipped instead of producing zero-length segments; the instruction ``mask`` of an inserted
BOS/EOS/middle token is 0 (the reference writes the token id into the mask column); every dropped
token is counted in :class:`PackStats` instead of disappearing silently; with both
``split_by_domain`` and ``split_lengths`` every (domain, chunk length) subset has its own buffer
(the reference keys its split buffers by chunk length only, mixing domains in one sample); token
ids, masks and (with ``split_by_domain``) domain names are checked before use, never cast or
joined blindly: ids must be integers below the vocabulary (or 2**32), masks unsigned below 256,
a domain one plain folder name.

Input must be raw documents: an input folder that is already packed (an ``indices`` column) is
refused, since reading its samples as documents would silently drop their document boundaries;
such a folder is used as a training domain as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prolong_nemo.data.mds import (
    LLAMA3_VOCAB_SIZE,
    MASK_COLUMN,
    PACKED_COLUMNS,
    SHARD_SIZE_LIMIT,
    check_local_index,
    prepare_output_dir,
)
from prolong_nemo.data.packing import check_mask
from prolong_nemo.errors import DataError, UserError

LLAMA3_BOS_ID = 128000
LLAMA3_EOS_ID = 128001
UINT32_LIMIT = 1 << 32  # token ids and indices are written as uint32
UINT8_LIMIT = 1 << 8  # masks are written as uint8


@dataclass(frozen=True)
class PackOptions:
    """The reference packer's options (names follow datatools `PackOptions`)."""

    pack_length: int
    min_length: int = 1  # carried tails shorter than this are dropped
    split_lengths: tuple[int, ...] = ()  # cut documents into these chunk lengths, one subset each
    bos_id: int | None = None  # prepended to each document unless already its first token
    eos_id: int | None = None  # appended to each document unless already its last token
    mos_id: int | None = None  # prepended to every continuation (carried tail, later chunk)
    split_by_domain: bool = False  # one output subset per input `domain` (reference split_by_column)
    domain: str | None = None  # value of the `domain` column; default: subset path or input domain
    vocab_size: int | None = None  # token ids must be below this (None: below 2**32, the uint32 range)

    def __post_init__(self) -> None:
        if self.pack_length < 1:
            raise UserError(f"pack_length must be >= 1, got {self.pack_length}")
        if self.min_length < 1:
            # A zero-length carried tail would become an empty segment in `indices`.
            raise UserError(f"min_length must be >= 1, got {self.min_length}")
        if any(n < 1 for n in self.split_lengths):
            raise UserError(f"split lengths must be >= 1, got {self.split_lengths}")
        if self.vocab_size is not None and not 1 <= self.vocab_size <= UINT32_LIMIT:
            raise UserError(f"vocab_size must be in [1, {UINT32_LIMIT}], got {self.vocab_size}")
        for name, token in (("BOS", self.bos_id), ("EOS", self.eos_id), ("middle", self.mos_id)):
            if token is not None and not 0 <= token < self.token_limit:
                raise UserError(f"{name} id {token} is outside the vocabulary [0, {self.token_limit})")

    @property
    def token_limit(self) -> int:
        """Token ids must be below this: the vocabulary size where known, else the uint32 range."""
        return UINT32_LIMIT if self.vocab_size is None else self.vocab_size

    @property
    def sorted_split_lengths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.split_lengths), reverse=True))


@dataclass
class Document:
    """One raw (unpacked) document: token ids without BOS/EOS, optional instruction mask."""

    input_ids: np.ndarray  # integer token ids, checked (and cast to uint32) by the Packer
    domain: str
    mask: np.ndarray | None = None  # unsigned integers (values < 256), same length
    source: str = ""  # names the document in errors, e.g. "<mds folder> sample <i>"


@dataclass
class Segment:
    """A piece of a document waiting in a pack buffer."""

    input_ids: np.ndarray
    mask: np.ndarray | None
    domain: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedSample:
    input_ids: np.ndarray  # uint32 [pack_length]
    indices: np.ndarray  # uint32 [n_segments, 2], [start, end)
    domain: str
    mask: np.ndarray | None = None  # uint8 [pack_length]

    def to_mds(self) -> dict:
        sample = {
            "input_ids": self.input_ids,
            "indices": self.indices,
            "length": int(len(self.input_ids)),
            "domain": self.domain,
        }
        if self.mask is not None:
            sample["mask"] = self.mask
        return sample


@dataclass
class PackStats:
    """Token accounting: tokens_in + special_tokens_added == tokens_out + all dropped tokens."""

    documents_in: int = 0
    tokens_in: int = 0
    empty_documents: int = 0
    special_tokens_added: int = 0
    samples_out: dict[str, int] = field(default_factory=dict)
    tokens_out: int = 0
    dropped_short_tail: int = 0  # carried tails shorter than min_length
    dropped_tails: int = 0
    dropped_below_split: int = 0  # documents / remainders shorter than the smallest split length
    documents_below_split: int = 0  # whole documents shorter than the smallest split length
    dropped_final_buffer: dict[str, int] = field(default_factory=dict)  # never-emitted partial buffers

    @property
    def tokens_dropped(self) -> int:
        return self.dropped_short_tail + self.dropped_below_split + sum(self.dropped_final_buffer.values())

    @property
    def balanced(self) -> bool:
        return self.tokens_in + self.special_tokens_added == self.tokens_out + self.tokens_dropped

    def report(self) -> str:
        lines = [
            f"documents in: {self.documents_in} ({self.empty_documents} empty, skipped)",
            f"tokens in: {self.tokens_in} (+{self.special_tokens_added} BOS/EOS/middle tokens inserted)",
            f"tokens out: {self.tokens_out}",
        ]
        for subset, n in sorted(self.samples_out.items()):
            lines.append(f"  subset {subset or '.'}: {n} samples")
        lines.append(f"tokens dropped: {self.tokens_dropped}")
        lines.append(f"  carried tails shorter than min_length: {self.dropped_short_tail} tokens "
                     f"in {self.dropped_tails} tails")
        if self.dropped_below_split or self.documents_below_split:
            lines.append(f"  shorter than the smallest split length: {self.dropped_below_split} tokens "
                         f"({self.documents_below_split} whole documents)")
        for subset, n in sorted(self.dropped_final_buffer.items()):
            lines.append(f"  final partial buffer of subset {subset or '.'} (never emitted): {n} tokens")
        lines.append("accounting: " + ("balanced" if self.balanced else "UNBALANCED (bug)"))
        return "\n".join(lines)


def add_special_tokens(seg: Segment, token_id: int | None, *, at_end: bool = False) -> tuple[Segment, int]:
    """Prepend (or append) `token_id` unless absent, the segment is empty, or it is already there.

    Returns the new segment and the number of tokens inserted. Inserted tokens get mask 0.
    """
    if token_id is None or len(seg) == 0:
        return seg, 0
    edge = seg.input_ids[-1] if at_end else seg.input_ids[0]
    if edge == token_id:
        return seg, 0
    tok = np.array([token_id], dtype=np.uint32)
    ids = (seg.input_ids, tok) if at_end else (tok, seg.input_ids)
    mask = None
    if seg.mask is not None:
        zero = np.zeros(1, dtype=np.uint8)
        mask = np.concatenate((seg.mask, zero) if at_end else (zero, seg.mask))
    return Segment(np.concatenate(ids), mask, seg.domain), 1


class PackBuffer:
    """The reference's SingleBuffer for one output subset, with the mask kept in lockstep."""

    def __init__(self, subset: str, options: PackOptions, stats: PackStats) -> None:
        self.subset = subset
        self.options = options
        self.stats = stats
        self.segments: list[Segment] = []
        self.num_tokens = 0

    def add(self, seg: Segment) -> Iterator[PackedSample]:
        self.segments.append(seg)
        self.num_tokens += len(seg)
        length = self.options.pack_length
        while self.num_tokens >= length:
            # Only the last segment can overflow: the buffer was below pack_length before it came.
            *head, last = self.segments
            cut = length - sum(len(s) for s in head)
            pieces = head + [Segment(last.input_ids[:cut], _slice(last.mask, 0, cut), last.domain)]
            yield self._emit(pieces)
            tail = Segment(last.input_ids[cut:], _slice(last.mask, cut, None), last.domain)
            self.segments, self.num_tokens = [], 0
            tail, added = add_special_tokens(tail, self.options.mos_id)
            self.stats.special_tokens_added += added
            if len(tail) >= self.options.min_length:
                self.segments, self.num_tokens = [tail], len(tail)
            elif len(tail):
                self.stats.dropped_short_tail += len(tail)
                self.stats.dropped_tails += 1

    def _emit(self, pieces: list[Segment]) -> PackedSample:
        ends = np.cumsum([len(p) for p in pieces])
        indices = np.stack([ends - [len(p) for p in pieces], ends], axis=1).astype(np.uint32)
        mask = None
        if pieces[0].mask is not None:
            mask = np.concatenate([p.mask for p in pieces]).astype(np.uint8, copy=False)
        domain = self.options.domain or self.subset or pieces[0].domain
        self.stats.samples_out[self.subset] = self.stats.samples_out.get(self.subset, 0) + 1
        self.stats.tokens_out += self.options.pack_length
        ids = np.concatenate([p.input_ids for p in pieces]).astype(np.uint32, copy=False)
        return PackedSample(ids, indices.reshape(-1, 2), domain, mask)

    def finish(self) -> None:
        """Account for the final partial buffer, which the reference never emits."""
        self.stats.dropped_final_buffer[self.subset] = self.num_tokens
        self.segments, self.num_tokens = [], 0


def _slice(mask: np.ndarray | None, start: int, stop: int | None) -> np.ndarray | None:
    return None if mask is None else mask[start:stop]


def subset_name(chunk_length: int, pack_length: int) -> str:
    """Subset folder of `chunk_length` chunks packed to `pack_length` (the reference's naming)."""
    return f"{chunk_length}-{pack_length}"


class Packer:
    """Routes documents to per-subset buffers and yields (subset, sample) in emission order."""

    def __init__(self, options: PackOptions) -> None:
        self.options = options
        self.stats = PackStats()
        self.buffers: dict[str, PackBuffer] = {}
        self.with_mask: bool | None = None  # fixed by the first document: samples share one column set

    def buffer(self, subset: str) -> PackBuffer:
        if subset not in self.buffers:
            self.buffers[subset] = PackBuffer(subset, self.options, self.stats)
        return self.buffers[subset]

    def add(self, doc: Document) -> Iterator[tuple[str, PackedSample]]:
        where = doc.source or f"document {self.stats.documents_in}"
        if self.with_mask is None:
            self.with_mask = doc.mask is not None
        if self.with_mask != (doc.mask is not None):
            raise DataError(f"{where} (domain {doc.domain!r}) "
                             f"{'lacks' if self.with_mask else 'has'} a mask unlike the first document")
        if doc.mask is not None and len(doc.mask) != len(doc.input_ids):
            raise DataError(f"{where}: mask length {len(doc.mask)} != {len(doc.input_ids)} tokens")
        ids = checked_token_ids(doc.input_ids, self.options.token_limit, where)
        mask = None if doc.mask is None else checked_mask(doc.mask, where)
        if self.options.split_by_domain:
            check_path_component(doc.domain, where)
        self.stats.documents_in += 1
        self.stats.tokens_in += len(ids)
        if len(ids) == 0:
            self.stats.empty_documents += 1
            return
        seg = Segment(ids, mask, doc.domain)
        seg = self._wrap(seg)
        base = doc.domain if self.options.split_by_domain else ""
        if not self.options.split_lengths:
            buf = self.buffer(base)
            for sample in buf.add(seg):
                yield buf.subset, sample
            return
        yield from self._add_split(seg, base)

    def _wrap(self, seg: Segment) -> Segment:
        seg, bos = add_special_tokens(seg, self.options.bos_id)
        seg, eos = add_special_tokens(seg, self.options.eos_id, at_end=True)
        self.stats.special_tokens_added += bos + eos
        return seg

    def _add_split(self, seg: Segment, base: str) -> Iterator[tuple[str, PackedSample]]:
        lengths = self.options.sorted_split_lengths
        if len(seg) < lengths[-1]:
            self.stats.documents_below_split += 1
        while len(seg) >= lengths[-1]:
            target = next(n for n in lengths if len(seg) >= n)  # longest chunk that fits
            buf = self.buffer(str(Path(base) / subset_name(target, self.options.pack_length)))
            chunk = Segment(seg.input_ids[:target], _slice(seg.mask, 0, target), seg.domain)
            for sample in buf.add(chunk):
                yield buf.subset, sample
            rest = Segment(seg.input_ids[target:], _slice(seg.mask, target, None), seg.domain)
            seg, added = add_special_tokens(rest, self.options.mos_id)
            self.stats.special_tokens_added += added
        self.stats.dropped_below_split += len(seg)

    def finish(self) -> PackStats:
        for buf in self.buffers.values():
            buf.finish()
        return self.stats


def checked_token_ids(ids, limit: int, where: str) -> np.ndarray:
    """`ids` as uint32 after checking they are integers in [0, limit): a cast never changes a token."""
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise DataError(f"{where}: input_ids must be integers, got {ids.dtype}")
    if len(ids):
        # widen before comparing: every signed value fits int64, every unsigned one uint64
        wide = ids.astype(np.int64 if ids.dtype.kind == "i" else np.uint64)
        bad = np.flatnonzero((wide < 0) | (wide >= limit))
        if len(bad):
            raise DataError(f"{where}: token id {int(ids[bad[0]])} at position {int(bad[0])} is outside "
                            f"[0, {limit})")
    return ids.astype(np.uint32, copy=False)


def checked_mask(mask, where: str) -> np.ndarray:
    """`mask` as uint8 after checking it is unsigned (or bool) with values below 256.

    Values are kept as they are (a target is `mask != 0`, docs/batch-contract.md); one that does
    not fit uint8 is refused rather than wrapped (256 would silently become 0, "not a target").
    """
    mask = np.asarray(mask).reshape(-1)
    check_mask(mask, where)
    bad = np.flatnonzero(mask >= UINT8_LIMIT) if mask.dtype.kind == "u" else ()
    if len(bad):
        raise DataError(f"{where}: mask value {int(mask[bad[0]])} at position {int(bad[0])} does not fit uint8")
    return mask.astype(np.uint8, copy=False)


def check_path_component(domain: str, where: str) -> None:
    """With split_by_domain the `domain` value names an output folder: it must be one plain name.

    Refused, not sanitized: a mapping such as "../x" -> "x" could merge two domains into one
    folder or write where nobody looks; refusing loses nothing silently. Refused: empty, "." and
    "..", anything with a path separator (so no absolute path), and NUL.
    """
    if not domain or domain in (".", "..") or any(c in domain for c in ("/", "\\", "\0")):
        raise DataError(f"{where}: domain {domain!r} is not one safe path component (an output folder "
                        "name under --split-by-domain); rename the domain or pack without splitting")


def pack_documents(docs: Iterable[Document], options: PackOptions) -> tuple[list[tuple[str, PackedSample]], PackStats]:
    """Pack in memory (small inputs, tests): returns [(subset, sample)] in emission order and stats."""
    packer = Packer(options)
    out = [item for doc in docs for item in packer.add(doc)]
    return out, packer.finish()


# ---------------------------------------------------------------------------------------------
# MDS input / output


def find_mds_dirs(path: Path) -> list[Path]:
    """MDS dataset folders (with an index.json) at or below `path`, sorted for a stable order."""
    path = Path(path)
    if (path / "index.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob("index.json"))
    if not found:
        raise FileNotFoundError(f"no MDS index.json at or below {path}")
    return found


def count_samples(mds_dir: Path) -> int:
    return sum(int(s["samples"]) for s in json.loads((Path(mds_dir) / "index.json").read_text())["shards"])


def read_columns(mds_dir: Path) -> dict[str, str]:
    """Column name -> MDS encoding of a dataset folder (from the first shard's index entry)."""
    shards = json.loads((Path(mds_dir) / "index.json").read_text())["shards"]
    if not shards:
        return {}
    info = shards[0]
    return dict(zip(info["column_names"], info["column_encodings"]))


def iter_raw_documents(mds_dirs: Sequence[Path]) -> Iterator[Document]:
    """Raw documents of the given MDS folders, in order, validating the columns."""
    from streaming.base.local import LocalDataset

    for mds_dir in mds_dirs:
        columns = read_columns(mds_dir)
        if "input_ids" not in columns:
            raise DataError(f"{mds_dir}: no `input_ids` column (columns: {sorted(columns)})")
        check_local_index(str(mds_dir))  # before streaming decodes anything (pkl columns, stray paths)
        data = LocalDataset(str(mds_dir))
        for i in range(len(data)):
            yield _to_document(data[i], mds_dir, i)


def _to_document(sample: dict, mds_dir: Path, i: int) -> Document:
    # No cast here: the Packer checks dtype kind and range (and the vocabulary) before casting.
    where = f"{mds_dir} sample {i}"
    ids = np.asarray(sample["input_ids"]).reshape(-1)
    if "length" in sample and int(sample["length"]) != len(ids):
        raise DataError(f"{where}: length {sample['length']} != len(input_ids) {len(ids)}")
    mask = sample.get("mask")
    if mask is not None:
        mask = np.asarray(mask).reshape(-1)
        if len(mask) != len(ids):
            raise DataError(f"{where}: len(mask) {len(mask)} != len(input_ids) {len(ids)}")
    return Document(ids, str(sample.get("domain", "")), mask, source=where)


def refuse_packed_inputs(mds_dirs: Sequence[Path]) -> None:
    """Packed input (ProLong-format samples, any shard with an `indices` column) read as raw
    documents would lose its document boundaries: refused, naming the folder."""
    for mds_dir in mds_dirs:
        shards = json.loads((Path(mds_dir) / "index.json").read_text())["shards"]
        if any("indices" in shard.get("column_names", ()) for shard in shards):
            raise DataError(f"{mds_dir}: already packed (its samples have an `indices` column of document "
                            "boundaries, which packing again would drop); use the folder directly as a "
                            "training domain (a data.mixture path) instead of packing it")


def has_mask_column(mds_dirs: Sequence[Path]) -> bool:
    """Whether the inputs carry `mask`; all inputs must agree, since the output column set is fixed."""
    flags = {d: "mask" in read_columns(d) for d in mds_dirs}
    if len(set(flags.values())) > 1:
        with_mask = [str(d) for d, f in flags.items() if f]
        raise DataError(f"only some inputs have a `mask` column ({with_mask}); pack them separately")
    return bool(flags) and next(iter(flags.values()))


class SubsetWriters:
    """One MDSWriter per output subset folder (uncompressed, 64 MiB shards, index.json at its root)."""

    def __init__(self, out_dir: Path, with_mask: bool) -> None:
        self.out_dir = Path(out_dir)
        self.columns = dict(PACKED_COLUMNS) | (MASK_COLUMN if with_mask else {})
        self.writers: dict[str, object] = {}

    def write(self, subset: str, sample: PackedSample) -> None:
        from streaming import MDSWriter

        if subset not in self.writers:
            out = self.out_dir / subset if subset else self.out_dir
            self.writers[subset] = MDSWriter(columns=self.columns, out=str(out), compression=None,
                                             size_limit=SHARD_SIZE_LIMIT)
        self.writers[subset].write(sample.to_mds())

    def close(self) -> None:
        for writer in self.writers.values():
            writer.finish()
        self.writers.clear()

    def cancel(self) -> None:
        for writer in self.writers.values():
            writer.cancel_future_jobs()
        self.writers.clear()


def pack_mds(inputs: Sequence[Path], out_dir: Path, options: PackOptions, *,
             overwrite: bool = False, progress: bool = True) -> PackStats:
    """Pack raw MDS documents (folders or trees of folders) into ProLong-format MDS under `out_dir`.

    Subsets: `out_dir` itself, or `out_dir/<domain>` with split_by_domain, each with
    `<chunk>-<pack_length>` sub-folders when split_lengths is set. Already-packed inputs (an
    `indices` column) are refused before anything is written: they are training domains as they are.
    """
    from tqdm import tqdm

    mds_dirs = [d for p in inputs for d in find_mds_dirs(Path(p))]
    refuse_packed_inputs(mds_dirs)
    with_mask = has_mask_column(mds_dirs)
    prepare_output_dir(Path(out_dir), overwrite)
    packer, writers = Packer(options), SubsetWriters(Path(out_dir), with_mask)
    try:
        docs = tqdm(iter_raw_documents(mds_dirs), desc="pack", unit="doc", disable=not progress,
                    mininterval=1.0, total=sum(map(count_samples, mds_dirs)))
        for doc in docs:
            for subset, sample in packer.add(doc):
                writers.write(subset, sample)
        writers.close()
    except BaseException:
        # Never leave a partial dataset with a valid-looking index.json behind.
        writers.cancel()
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return packer.finish()


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="raw MDS folders (or trees of them) of unpacked "
                        "documents; already-packed folders (an `indices` column) are refused: train on them directly")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("-l", "--pack-length", type=int, required=True, help="tokens per packed sample")
    parser.add_argument("-s", "--min-length", type=int, default=1,
                        help="drop carried tails shorter than this (default 1)")
    parser.add_argument("-f", "--split-lengths", type=int, nargs="+", default=(),
                        help="cut documents into the longest fitting of these chunk lengths, one subset each")
    parser.add_argument("-T", "--tokenizer", choices=["llama3"], default=None,
                        help="insert this tokenizer's BOS/EOS (llama3: 128000/128001)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"token ids must be below this (default: {LLAMA3_VOCAB_SIZE} with -T llama3, "
                             "else the uint32 range)")
    parser.add_argument("--bos-id", type=int, default=None, help="BOS id to prepend (overrides -T)")
    parser.add_argument("--eos-id", type=int, default=None, help="EOS id to append (overrides -T)")
    parser.add_argument("--use-for-mos", choices=["bos", "eos"], default=None,
                        help="token prepended to every continuation of a cut document")
    parser.add_argument("--split-by-domain", action="store_true", help="one subset per input domain")
    parser.add_argument("--domain", default=None, help="value of the `domain` column")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> PackOptions:
    bos, eos = (LLAMA3_BOS_ID, LLAMA3_EOS_ID) if args.tokenizer == "llama3" else (None, None)
    bos = args.bos_id if args.bos_id is not None else bos
    eos = args.eos_id if args.eos_id is not None else eos
    mos = {"bos": bos, "eos": eos, None: None}[args.use_for_mos]
    if args.use_for_mos and mos is None:
        raise SystemExit(f"--use-for-mos {args.use_for_mos} needs a {args.use_for_mos} id (-T or --{args.use_for_mos}-id)")
    vocab = args.vocab_size if args.vocab_size is not None else (
        LLAMA3_VOCAB_SIZE if args.tokenizer == "llama3" else None)
    return PackOptions(pack_length=args.pack_length, min_length=args.min_length,
                       split_lengths=tuple(args.split_lengths), bos_id=bos, eos_id=eos, mos_id=mos,
                       split_by_domain=args.split_by_domain, domain=args.domain, vocab_size=vocab)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    start = time.perf_counter()
    stats = pack_mds(args.inputs, args.output, options, overwrite=args.overwrite,
                     progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(stats.report())
    if not stats.samples_out:
        print(f"warning: no sample written: fewer than --pack-length {options.pack_length} tokens reached a buffer")
    print(f"packed {stats.tokens_in} tokens in {seconds:.1f}s "
          f"({stats.tokens_in / max(seconds, 1e-9) / 1e6:.2f}M tokens/s) -> {args.output}")
    return 0 if stats.balanced else 1
