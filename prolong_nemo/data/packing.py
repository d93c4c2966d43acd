"""One ProLong sample -> one packed THD training row (docs/batch-contract.md).

Targets follow the reference exactly (ProLong's DataCollator, training/dataset.py in
github.com/princeton-nlp/ProLong): inside each document segment
every token predicts the next token of the same document, segments of at most one token are
dropped (they carry no target and attend to nothing else), and with an instruction ``mask`` only
tokens whose *target* is an assistant token count. For context parallelism every segment is
padded at its tail to a multiple of ``2 * cp_size`` so TE's ``thd_get_partitioned_indices``
gives each rank whole, load-balanced chunks; padding is never a target.

The tests check every row against a plain per-document reference; ``bench/bench_data.py`` times
``build_row`` against a straightforward per-document implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prolong_nemo.errors import DataError

PAD_TOKEN_ID = 0  # any valid id: padding never becomes a target and nothing attends to it
# Warn when more than this share of a domain's tokens lies in no document of `indices`: those
# tokens are never fed, so the data trains less than it seems (e.g. indices covering 22 of 512).
UNCOVERED_WARN_SHARE = 0.01


@dataclass(frozen=True)
class PackingConfig:
    """How samples become rows. ``cp_size``/``tp_size``/``sequence_parallel`` come from the run."""

    cp_size: int = 1
    tp_size: int = 1
    sequence_parallel: bool = False
    document_masking: bool = True  # False: one segment per sample (ProLong's ablation)
    # Use the MDS `mask` column (assistant tokens only) where present. The reference applies it
    # only in SFT (`apply_instruct_masks`): the pretraining stages train on all of tuluv2.
    instruction_masks: bool = True

    def __post_init__(self) -> None:
        for name in ("cp_size", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def segment_multiple(self) -> int:
        """Every padded segment length is a multiple of this (TE's THD CP partition: 2 * cp)."""
        return 2 * self.cp_size if self.cp_size > 1 else 1

    @property
    def row_multiple(self) -> int:
        """The row length is a multiple of this (segments, and T / cp divisible by TP under SP)."""
        sp = self.tp_size if self.sequence_parallel else 1
        return math.lcm(self.segment_multiple, self.cp_size * sp)


def document_segments(length: int, indices: np.ndarray | None, document_masking: bool) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every trainable segment: the documents, or the whole sample.

    Segments of length <= 1 are dropped, as in the reference: they hold no target. Tokens that
    no segment covers are not part of the row (the reference never feeds them either).
    """
    if indices is None or len(indices) == 0 or not document_masking:
        starts = np.zeros(1, dtype=np.int64)
        ends = np.full(1, length, dtype=np.int64)
    else:
        starts = indices[:, 0].astype(np.int64)
        ends = indices[:, 1].astype(np.int64)
    keep = ends - starts > 1
    return starts[keep], ends[keep]


def uncovered_tokens(length: int, indices: np.ndarray | None) -> int:
    """Tokens of a sample that no document of `indices` covers (none without indices: one document)."""
    if indices is None or len(indices) == 0:
        return 0
    idx = np.asarray(indices, dtype=np.int64)
    covered = np.zeros(length + 1, dtype=np.int64)
    np.add.at(covered, np.clip(idx[:, 0], 0, length), 1)
    np.add.at(covered, np.clip(idx[:, 1], 0, length), -1)
    return int((np.cumsum(covered)[:-1] <= 0).sum())


def uncovered_warning(where: str, uncovered: int, tokens: int, scope: str = "") -> str:
    """The line that warns of tokens no document covers (above UNCOVERED_WARN_SHARE)."""
    return (f"{where}: {uncovered} of {tokens} tokens ({100 * uncovered / max(tokens, 1):.2f}%){scope} are in no "
            f"document (indices) and are never trained (above {100 * UNCOVERED_WARN_SHARE:g}%)")


def check_mask(mask: np.ndarray | None, where: str) -> None:
    """Masks are unsigned integers (or bool): a target is ``mask != 0`` with loss weight 1.

    Signed or float masks are refused: an int8 -1 used as a weight meant gradient ascent.
    """
    if mask is not None and np.asarray(mask).dtype.kind not in "ub":
        raise DataError(f"{where}: mask must be unsigned integers (target = mask != 0), "
                        f"got {np.asarray(mask).dtype}")


def padded_lengths(lengths: np.ndarray, config: PackingConfig) -> np.ndarray:
    """Tail-pad each segment to the CP multiple; the last one also absorbs the row multiple."""
    m = config.segment_multiple
    padded = -(-lengths // m) * m
    if len(padded):
        total = int(padded.sum())
        padded[-1] += -total % config.row_multiple
    return padded


def padding_overhead(document_lengths: np.ndarray, config: PackingConfig) -> float:
    """Padding tokens per real token for one sample's documents (what CP padding costs)."""
    lengths = np.asarray(document_lengths, dtype=np.int64)
    lengths = lengths[lengths > 1]
    real = int(lengths.sum())
    return (int(padded_lengths(lengths, config).sum()) - real) / real if real else 0.0


def build_row(
    input_ids: np.ndarray,
    indices: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    config: PackingConfig = PackingConfig(),
    where: str = "sample",
) -> dict[str, np.ndarray]:
    """Turn one validated sample into the row arrays of docs/batch-contract.md (no batch axis).

    ``where`` names the sample in errors (a signed or float ``mask`` is refused).
    """
    check_mask(mask, where)
    starts, ends = document_segments(len(input_ids), indices, config.document_masking)
    if not config.instruction_masks:
        mask = None
    padded = padded_lengths(ends - starts, config)
    cu_padded = np.zeros(len(padded) + 1, dtype=np.int64)
    np.cumsum(padded, out=cu_padded[1:])
    row_length = int(cu_padded[-1])

    # Padding stays zero: pad id 0, label 0, loss_mask 0.
    tokens = np.zeros(row_length, dtype=np.int64)
    labels = np.zeros(row_length, dtype=np.int64)
    loss_mask = np.zeros(row_length, dtype=np.float32)
    position_ids = np.empty(row_length, dtype=np.int64)
    ramp = np.arange(int(padded.max()) if len(padded) else 0, dtype=np.int64)
    # Slice copies straight into the preallocated row run at memcpy speed; one gather index over
    # the whole row (fully vectorized) measured slower for every document count we tried.
    for a, b, o, p in zip(starts.tolist(), ends.tolist(), cu_padded[:-1].tolist(), padded.tolist()):
        n = b - a
        tokens[o:o + n] = input_ids[a:b]
        labels[o:o + n - 1] = input_ids[a + 1:b]  # the next token of the same document
        # A target is an assistant next token (mask != 0), always with weight 1: never the mask
        # value itself (a mask of 2 or 4e9 would scale the loss and overflow the token count).
        loss_mask[o:o + n - 1] = 1 if mask is None else mask[a + 1:b] != 0
        position_ids[o:o + p] = ramp[:p]
    if mask is not None:
        labels[loss_mask == 0] = 0
    return packed_metadata(tokens, labels, loss_mask, position_ids, cu_padded, padded)


def packed_metadata(tokens, labels, loss_mask, position_ids, cu_padded, padded) -> dict[str, np.ndarray]:
    """The row plus the packed-sequence keys of Megatron-Bridge 0.6 and the legacy 0.5 ones."""
    cu = cu_padded.astype(np.int32)
    max_seqlen = np.array([int(padded.max()) if len(padded) else 0], dtype=np.int32)
    n_bounds = np.array([len(cu)], dtype=np.int64)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        # Bridge 0.6: real == padded boundaries (padding inside each segment's tail, masked by
        # loss_mask) keeps both FlashAttention and cuDNN eligible.
        "cu_seqlens_q": cu,
        "cu_seqlens_kv": cu,
        "cu_seqlens_q_padded": cu,
        "cu_seqlens_kv_padded": cu,
        "max_seqlen_q": max_seqlen,
        "max_seqlen_kv": max_seqlen,
        # Bridge 0.5 legacy keys (micro-batch size 1, so no -1 fill is needed). No
        # `cu_seqlens_unpadded`: Bridge would then pass real != padded boundaries and leave only
        # cuDNN eligible; without it both Bridge versions run the same attention.
        "cu_seqlens": cu,
        "cu_seqlens_argmin": n_bounds,
        "max_seqlen": max_seqlen,
    }
