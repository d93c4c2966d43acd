"""Per-document CP partitioning of THD rows (TE's thd_get_partitioned_indices semantics)."""

from __future__ import annotations

import pytest
import torch

from prolong_nemo.model.context_parallel import (
    partition_batch_for_cp,
    te_partition_indices,
    thd_partition_indices,
)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("lengths", [[16], [8, 24, 16], [8, 8, 8, 8, 32, 48]])
def test_every_token_on_exactly_one_rank_with_mirrored_chunks(cp, lengths):
    lengths = [n * cp for n in lengths]  # multiples of 2*cp
    cu, total = _cu(lengths), sum(lengths)
    owner = torch.full((total,), -1)
    for rank in range(cp):
        idx = thd_partition_indices(cu, total, cp, rank)
        assert idx.numel() == total // cp
        assert (owner[idx] == -1).all(), "token assigned twice"
        owner[idx] = rank
        # explicit expectation: chunk r and 2c-1-r of every segment, segments in order
        expected = []
        for start, n in zip(cu[:-1].tolist(), lengths):
            c = n // (2 * cp)
            expected += list(range(start + rank * c, start + (rank + 1) * c))
            expected += list(range(start + (2 * cp - 1 - rank) * c, start + (2 * cp - rank) * c))
        assert idx.tolist() == expected
    assert (owner >= 0).all(), "token on no rank"


def test_rank_chunks_for_cp2_by_hand():
    # one segment of 8 with cp=2: chunks of 2 -> rank0 [0,1,6,7], rank1 [2,3,4,5]
    cu = _cu([8, 4])
    assert thd_partition_indices(cu, 12, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert thd_partition_indices(cu, 12, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]


@pytest.mark.parametrize(
    "lengths,total",
    [([6, 8], 14), ([8, 8], 20)],  # 6 is not a multiple of 2*cp=4; last boundary != T
)
def test_invalid_rows_are_rejected_not_rounded(lengths, total):
    with pytest.raises(ValueError):
        thd_partition_indices(_cu(lengths), total, 2, 0)


def test_partition_batch_selects_token_keys_and_keeps_global_boundaries():
    from model_fixtures import collate_row, make_row

    batch = collate_row(make_row([13, 30, 7], vocab=100, seed=2, cp_size=2))
    parts = [partition_batch_for_cp(batch, 2, r) for r in range(2)]
    total = batch["tokens"].size(1)
    for r, part in enumerate(parts):
        idx = thd_partition_indices(batch["cu_seqlens_q_padded"][0], total, 2, r)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(part[key], batch[key][:, idx])
        assert torch.equal(part["cu_seqlens_q_padded"], batch["cu_seqlens_q_padded"])
    # the loss mask (targets) is split, not duplicated or lost
    assert parts[0]["loss_mask"].sum() + parts[1]["loss_mask"].sum() == batch["loss_mask"].sum()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TE's kernel needs CUDA")
def test_matches_transformer_engine():
    cu = _cu([8, 24, 16, 64])
    for cp in (2, 4):
        for rank in range(cp):
            te = te_partition_indices(cu, 112, cp, rank)
            if te is None:
                pytest.skip("Transformer Engine not installed")
            assert te.cpu().tolist() == thd_partition_indices(cu, 112, cp, rank).tolist()
