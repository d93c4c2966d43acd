"""Tokenize text / JSONL / chat JSONL into raw MDS documents (Llama-3 tokenizer, or --tokenizer DIR).

Inputs (format picked per file with ``--format auto``):

* ``text``: a plain-text file is one document;
* ``jsonl``: one JSON object per line with a string ``text`` field (and optional ``domain``);
* ``chat``: one JSON object per line with ``messages``: [{"role": ..., "content": ...}, ...]
  (UltraChat / ProLong SFT style), rendered in the Llama-3 chat format
  ``<|begin_of_text|>`` + per message ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  (content stripped, as the Hugging Face Llama-3 template does), with an instruction ``mask`` of 1
  on assistant content and its closing ``<|eot_id|>``, 0 elsewhere.

Output: one MDS folder of raw documents: ``input_ids`` (ndarray:uint32, no BOS/EOS for text),
``length`` (int), ``domain`` (str) and, for chat data, ``mask`` (ndarray:uint8). Documents are
written in input order whatever the number of worker processes. The tokenizer is Meta's
(llama-models, offline); special tokens written literally in text are encoded as plain text.

With ``--tokenizer DIR`` (a Hugging Face tokenizer folder, e.g. ``prolong-nemo data hf-tokenizer``'s)
documents are encoded with ``AutoTokenizer`` instead (special-token text still plain text) and chats
are rendered with that tokenizer's own chat template; the mask is 1 on what its template marks or
renders as the assistant turns (``prolong_nemo.data.hf_tokenizer.encode_chat``). With the Llama-3
folder both paths give the same ids and masks, except that special-token text inside chat contents
becomes the control token (as with any transformers chat template) and that the offline path splits
runs of over 25K whitespace / non-whitespace characters the way llama-models does (a run of 26K
spaces: one token more).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from prolong_nemo.data import hf_tokenizer
from prolong_nemo.data.mds import SHARD_SIZE_LIMIT, prepare_output_dir
from prolong_nemo.errors import UserError

ASSISTANT = "assistant"
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
RAW_COLUMNS = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str"}

# llama_models.llama3.tokenizer limits (its encode() splits on these before calling tiktoken)
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
# re's \s is str.isspace (Py_UNICODE_ISSPACE), the wrapper's test for a whitespace run
_LONG_RUN = re.compile(rf"\s{{{MAX_NO_WHITESPACES_CHARS + 1},}}|\S{{{MAX_NO_WHITESPACES_CHARS + 1},}}")


class InputError(UserError):
    """Malformed input; the message names the file and line."""


@dataclass(frozen=True)
class TokenizeOptions:
    fmt: str = "auto"  # auto | text | jsonl | chat
    text_field: str = "text"
    messages_field: str = "messages"
    domain: str | None = None  # default: a record's `domain` field, else the file's stem
    workers: int = 1
    batch_size: int = 32  # records per task sent to a worker
    tokenizer: str | None = None  # a Hugging Face tokenizer folder; None: Meta's offline Llama-3 tokenizer


@dataclass(frozen=True)
class RawRecord:
    """One unparsed document: parsing happens in the workers, errors keep file and line."""

    source: str
    line: int  # 1-based; 0 for a whole text file
    kind: str  # text | jsonl | chat
    payload: str
    domain: str


@dataclass
class EncodedDoc:
    input_ids: np.ndarray  # uint32
    domain: str
    mask: np.ndarray | None = None  # uint8


@dataclass
class TokenizeStats:
    files: int = 0
    records: int = 0
    documents_out: int = 0
    empty_skipped: int = 0
    tokens_out: int = 0
    masked_tokens: int = 0  # mask == 1 (chat)
    per_domain: dict[str, int] = field(default_factory=dict)  # documents per domain

    def report(self) -> str:
        lines = [f"files: {self.files}, records: {self.records}, documents written: {self.documents_out} "
                 f"({self.empty_skipped} empty skipped)", f"tokens: {self.tokens_out}"]
        if self.masked_tokens:
            lines.append(f"assistant (mask=1) tokens: {self.masked_tokens}")
        lines += [f"  domain {d}: {n} documents" for d, n in sorted(self.per_domain.items())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Encoding (runs in the workers)


def get_tokenizer():
    """Meta's Llama-3 tokenizer (cached per process)."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def encode_text(tok, text: str) -> list[int]:
    """Exactly `tok.encode(text, bos=False, eos=False)`; special-token text stays plain text."""
    if _LONG_RUN.search(text):
        return tok.encode(text, bos=False, eos=False, allowed_special=set(), disallowed_special=())
    # Fast path: without a run longer than the wrapper's limit, its per-character Python split loop
    # yields each TIKTOKEN_MAX_ENCODE_CHARS piece whole, so encode those pieces directly.
    ids: list[int] = []
    for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        ids += tok.model.encode(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS], allowed_special=set(), disallowed_special=())
    return ids


def encode_chat(tok, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Llama-3 chat format; mask 1 on assistant content and its <|eot_id|>, 0 elsewhere."""
    special = tok.special_tokens
    ids, mask = [tok.bos_id], [0]
    for msg in messages:
        header = ([special["<|start_header_id|>"]] + encode_text(tok, msg["role"])
                  + [special["<|end_header_id|>"]] + encode_text(tok, "\n\n"))
        body = encode_text(tok, msg["content"].strip()) + [tok.eot_id]
        ids += header + body
        mask += [0] * len(header) + [int(msg["role"] == ASSISTANT)] * len(body)
    return ids, mask


def _fail(rec: RawRecord, what: str) -> InputError:
    where = f"{rec.source}:{rec.line}" if rec.line else rec.source
    return InputError(f"{where}: {what}")


def _parse_json(rec: RawRecord) -> dict:
    try:
        obj = json.loads(rec.payload.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        raise _fail(rec, f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise _fail(rec, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _messages(rec: RawRecord, obj: dict, key: str) -> list[dict]:
    msgs = obj.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise _fail(rec, f"missing or empty '{key}' list")
    for j, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not msg["role"]:
            raise _fail(rec, f"{key}[{j}] needs a non-empty string 'role'")
        if not isinstance(msg.get("content"), str):
            raise _fail(rec, f"{key}[{j}] needs a string 'content'")
    return msgs


@functools.lru_cache(maxsize=None)
def get_encoders(tokenizer: str | None = None):
    """(encode_text(text), encode_chat(messages)) of the offline tokenizer, or of the Hugging Face
    tokenizer folder `tokenizer`; loaded once per process (each worker loads its own)."""
    if tokenizer is None:
        tok = get_tokenizer()
        return functools.partial(encode_text, tok), functools.partial(encode_chat, tok)
    hf = hf_tokenizer.load(tokenizer)
    return functools.partial(hf_tokenizer.encode_text, hf), functools.partial(hf_tokenizer.encode_chat, hf)


def encode_record(rec: RawRecord, opts: TokenizeOptions) -> EncodedDoc:
    text_ids, chat_ids = get_encoders(opts.tokenizer)
    if rec.kind == "text":
        return EncodedDoc(np.asarray(text_ids(rec.payload), dtype=np.uint32), rec.domain)
    obj = _parse_json(rec)
    domain = obj["domain"] if isinstance(obj.get("domain"), str) and opts.domain is None else rec.domain
    if rec.kind == "chat":
        try:
            ids, mask = chat_ids(_messages(rec, obj, opts.messages_field))
        except hf_tokenizer.ChatTemplateError as err:
            raise _fail(rec, str(err)) from None
        return EncodedDoc(np.asarray(ids, dtype=np.uint32), domain, np.asarray(mask, dtype=np.uint8))
    text = obj.get(opts.text_field)
    if not isinstance(text, str):
        raise _fail(rec, f"missing string field '{opts.text_field}'")
    return EncodedDoc(np.asarray(text_ids(text), dtype=np.uint32), domain)


def _encode_batch(args: tuple[list[RawRecord], TokenizeOptions]) -> list[EncodedDoc]:
    records, opts = args
    return [encode_record(rec, opts) for rec in records]


# ---------------------------------------------------------------------------------------------
# Reading inputs (main process: cheap, ordered)


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise InputError(f"{where}: not valid UTF-8 (byte {err.start})") from None


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a (gzipped) UTF-8 file."""
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):  # binary: JSON Lines separates records by b"\n" only
            if raw.strip():
                yield lineno, _decode(raw, path, lineno)


def detect_format(path: Path, opts: TokenizeOptions) -> str:
    """text for non-JSONL files; for JSONL, chat if the first record has the messages field."""
    if opts.fmt != "auto":
        return opts.fmt
    if not path.name.endswith(JSONL_SUFFIXES):
        return "text"
    for lineno, line in iter_lines(path):
        obj = _parse_json(RawRecord(str(path), lineno, "jsonl", line, ""))
        return "chat" if opts.messages_field in obj else "jsonl"
    return "jsonl"


def iter_records(path: Path, kind: str, opts: TokenizeOptions) -> Iterator[RawRecord]:
    domain = opts.domain or path.name.split(".")[0]
    if kind == "text":
        with _open_binary(path) as fh:
            yield RawRecord(str(path), 0, kind, _decode(fh.read(), path, 0), domain)
        return
    for lineno, line in iter_lines(path):
        yield RawRecord(str(path), lineno, kind, line, domain)


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to their files (sorted, recursively)."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise FileNotFoundError(f"no input files in {list(map(str, inputs))}")
    return files


def _batches(records: Iterator[RawRecord], size: int, opts: TokenizeOptions):
    while batch := list(islice(records, size)):
        yield batch, opts


def _all_records(files: Sequence[Path], kinds: Sequence[str], opts: TokenizeOptions) -> Iterator[RawRecord]:
    for path, kind in zip(files, kinds):
        yield from iter_records(path, kind, opts)


def encoded_docs(files: Sequence[Path], kinds: Sequence[str], opts: TokenizeOptions,
                 stats: TokenizeStats) -> Iterator[EncodedDoc]:
    """Encoded documents in input order; a Pool of `opts.workers` processes when > 1."""
    batches = _batches(_counted(_all_records(files, kinds, opts), stats), opts.batch_size, opts)
    if opts.workers <= 1:
        for batch in batches:
            yield from _encode_batch(batch)
        return
    # spawn: the parent holds writer/tqdm threads, which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(opts.workers) as pool:
        # A bounded window of tasks (Pool.imap would read the whole input ahead), consumed in order.
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * opts.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _counted(records: Iterator[RawRecord], stats: TokenizeStats) -> Iterator[RawRecord]:
    for rec in records:
        stats.records += 1
        yield rec


def tokenize_files(inputs: Sequence[Path], out_dir: Path, opts: TokenizeOptions = TokenizeOptions(), *,
                   overwrite: bool = False, progress: bool = True) -> TokenizeStats:
    """Tokenize files (or folders of files) into one raw-document MDS folder `out_dir`.

    With ``opts.workers > 1`` the workers are *spawned* (the caller may hold threads, which fork
    does not copy safely): each re-imports the caller's ``__main__``, so scripts need the usual
    ``if __name__ == "__main__":`` guard and a light main module. Output order never depends on it.
    """
    from streaming import MDSWriter
    from tqdm import tqdm

    files = expand_inputs(inputs)
    kinds = [detect_format(p, opts) for p in files]
    with_mask = _check_kinds(files, kinds)
    if opts.tokenizer is not None:  # a bad folder fails here, in one line, before any output exists
        hf_tokenizer.load(opts.tokenizer, need_chat_template=with_mask)
    stats = TokenizeStats(files=len(files))
    prepare_output_dir(Path(out_dir), overwrite)
    columns = dict(RAW_COLUMNS, **({"mask": "ndarray:uint8"} if with_mask else {}))
    writer = MDSWriter(columns=columns, out=str(out_dir), compression=None, size_limit=SHARD_SIZE_LIMIT)
    try:
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
        for doc in encoded_docs(files, kinds, opts, stats):
            _write(writer, doc, stats)
            bar.update(len(doc.input_ids))
        bar.close()
        writer.finish()
    except BaseException:
        # Never leave a partial dataset with a valid-looking index.json behind.
        writer.cancel_future_jobs()
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return stats


def _check_kinds(files: Sequence[Path], kinds: Sequence[str]) -> bool:
    """One output has one column set: chat (with mask) and plain text cannot be mixed."""
    unknown = {k for k in kinds} - {"text", "jsonl", "chat"}
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}")
    chat = [str(f) for f, k in zip(files, kinds) if k == "chat"]
    if chat and len(chat) != len(files):
        raise InputError(f"chat inputs {chat} mixed with plain-text inputs; tokenize them separately")
    return bool(chat)


def _write(writer, doc: EncodedDoc, stats: TokenizeStats) -> None:
    if len(doc.input_ids) == 0:
        stats.empty_skipped += 1
        return
    sample = {"input_ids": doc.input_ids, "length": int(len(doc.input_ids)), "domain": doc.domain}
    if doc.mask is not None:
        sample["mask"] = doc.mask
        stats.masked_tokens += int(doc.mask.sum())
    writer.write(sample)
    stats.documents_out += 1
    stats.tokens_out += len(doc.input_ids)
    stats.per_domain[doc.domain] = stats.per_domain.get(doc.domain, 0) + 1


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="text / JSONL / chat JSONL files or folders")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output MDS folder")
    parser.add_argument("--format", dest="fmt", choices=["auto", "text", "jsonl", "chat"], default="auto",
                        help="auto: *.jsonl[.gz] with a `messages` field -> chat, other *.jsonl -> jsonl, "
                             "anything else -> one text document per file")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--messages-field", default="messages")
    parser.add_argument("--domain", default=None, help="domain of every document (default: record "
                        "`domain` field, else the file name without extension)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="a Hugging Face tokenizer folder (AutoTokenizer) to encode with; chats are rendered "
                             "with its chat template (default: Meta's offline Llama-3 tokenizer and format)")
    parser.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=32, help="records per worker task")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = TokenizeOptions(fmt=args.fmt, text_field=args.text_field, messages_field=args.messages_field,
                           domain=args.domain, workers=args.workers, batch_size=args.batch_size,
                           tokenizer=args.tokenizer)
    start = time.perf_counter()
    stats = tokenize_files(args.inputs, args.output, opts, overwrite=args.overwrite,
                           progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(stats.report())
    print(f"{stats.tokens_out} tokens in {seconds:.1f}s ({stats.tokens_out / max(seconds, 1e-9) / 1e6:.2f}M "
          f"tokens/s, {opts.workers} workers) -> {args.output}")
    return 0
