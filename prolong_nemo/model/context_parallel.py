"""Per-document context-parallel partitioning of packed (THD) rows.

Transformer Engine's `thd_get_partitioned_indices(cu_seqlens_padded, T, cp_size, rank)`
splits every padded segment into 2*cp_size equal chunks and gives rank r the chunks r and
2*cp_size-1-r (load balance for causal attention). Megatron-Bridge's stock `gpt_step` does
this itself; our forward step (CPU runner and Bridge entry alike) calls
`partition_batch_for_cp`, which always uses the pure PyTorch version below, with or without
TE (tests check it against TE's kernel where TE and CUDA are present).
"""

from __future__ import annotations

import torch

# Token-aligned keys of the batch contract; cu_seqlens / max_seqlen stay global.
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def validate_cp_boundaries(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int) -> None:
    """TE silently rounds down non-divisible segments (a known bug): refuse them instead."""
    cu = cu_seqlens_padded.tolist()
    if cu[0] != 0 or cu[-1] != total_tokens:
        raise ValueError(f"padded cu_seqlens must run from 0 to {total_tokens}, got {cu[0]}..{cu[-1]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    bad = [n for n in lengths if n < 0 or n % (2 * cp_size)]
    if bad:
        raise ValueError(f"padded segment lengths {bad} are not multiples of 2*cp_size={2 * cp_size}")


def thd_partition_indices(
    cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Token indices owned by `cp_rank`: chunks r and 2c-1-r of every segment, in order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    validate_cp_boundaries(cu_seqlens_padded, total_tokens, cp_size)
    cu = cu_seqlens_padded.to(torch.int64)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    chunk = lengths // (2 * cp_size)
    pieces = []
    for start, c in zip(starts.tolist(), chunk.tolist()):
        front = start + cp_rank * c
        back = start + (2 * cp_size - 1 - cp_rank) * c
        pieces += [torch.arange(front, front + c), torch.arange(back, back + c)]
    if not pieces:
        return torch.empty(0, dtype=torch.int64, device=cu_seqlens_padded.device)
    return torch.cat(pieces).to(cu_seqlens_padded.device)


def te_partition_indices(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int, cp_rank: int):
    """TE's own kernel (CUDA only); None when TE is not installed."""
    try:
        import transformer_engine_torch as tex
    except ImportError:
        return None
    return tex.thd_get_partitioned_indices(cu_seqlens_padded.int().cuda(), total_tokens, cp_size, cp_rank)


def partition_batch_for_cp(batch: dict[str, torch.Tensor], cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """Select this rank's tokens of a collated micro-batch (batch axis 1)."""
    if cp_size == 1:
        return batch
    tokens = batch["tokens"]
    if tokens.size(0) != 1:
        raise ValueError("THD context parallelism needs micro-batch size 1")
    index = thd_partition_indices(batch["cu_seqlens_q_padded"][0], tokens.size(1), cp_size, cp_rank)
    out = dict(batch)
    for key in TOKEN_KEYS:
        if key in batch and batch[key] is not None:
            out[key] = batch[key].index_select(1, index.to(batch[key].device))
    return out
