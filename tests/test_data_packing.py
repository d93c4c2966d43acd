"""build_row against a plain per-document reference loop (ProLong's DataCollator, training/dataset.py in
github.com/princeton-nlp/ProLong: each `indices` segment is one document whose first token is not a target)."""

from collections import Counter

import numpy as np
import pytest

from prolong_nemo.data.packing import PackingConfig, build_row, padding_overhead

from data_fixtures import random_documents


def reference_triples(ids, indices, mask, document_masking=True):
    """The reference, one document at a time: (document, position, target) for every target."""
    if indices is None or len(indices) == 0 or not document_masking:
        indices = [(0, len(ids))]
    docs = [(int(a), int(b)) for a, b in indices if b - a > 1]
    triples = Counter()
    for k, (a, b) in enumerate(docs):
        doc = ids[a:b]
        labels = doc.astype(np.int64).copy()
        keep = np.ones(b - a, dtype=bool)
        keep[0] = False  # the first token of a document is never predicted
        if mask is not None:
            keep &= mask[a:b] != 0
        for t in range(b - a - 1):  # HF shift: position t predicts label t + 1
            if keep[t + 1]:
                triples[(k, t, int(labels[t + 1]))] += 1
    return triples, docs


def row_triples(row):
    cu = row["cu_seqlens_q_padded"]
    triples = Counter()
    for k in range(len(cu) - 1):
        for t in range(cu[k], cu[k + 1]):
            if row["loss_mask"][t]:
                triples[(k, int(row["position_ids"][t]), int(row["labels"][t]))] += 1
    return triples


CONFIGS = [
    PackingConfig(),
    PackingConfig(cp_size=2),
    PackingConfig(cp_size=8),
    PackingConfig(cp_size=4, tp_size=2, sequence_parallel=True),
    PackingConfig(cp_size=1, tp_size=8, sequence_parallel=True),
    PackingConfig(cp_size=2, document_masking=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
@pytest.mark.parametrize("with_mask", [False, True])
def test_targets_match_per_document_reference(config, with_mask):
    rng = np.random.default_rng(1)
    for trial in range(40):
        length = int(rng.integers(2, 300))
        ids, indices = random_documents(rng, length, max_docs=20)
        if trial % 7 == 0:
            indices = None  # a sample with no `indices`: one document
        mask = (rng.random(length) < 0.6).astype(np.uint8) if with_mask else None
        row = build_row(ids, indices, mask, config)
        expected, docs = reference_triples(ids, indices, mask, config.document_masking)
        assert row_triples(row) == expected
        check_row_layout(row, ids, docs, config)


def check_row_layout(row, ids, docs, config):
    """Attention confined to documents, CP-valid lengths, no real token dropped, pads inert."""
    cu = row["cu_seqlens_q_padded"]
    T = len(row["tokens"])
    assert cu[0] == 0 and cu[-1] == T and len(cu) == len(docs) + 1
    seg_lengths = np.diff(cu)
    assert np.all(seg_lengths % config.segment_multiple == 0)
    if config.sequence_parallel:
        assert (T // config.cp_size) % config.tp_size == 0 and T % config.cp_size == 0
    for k, (a, b) in enumerate(docs):
        # the document's tokens, in order, at the head of its segment; its positions restart at 0
        np.testing.assert_array_equal(row["tokens"][cu[k]:cu[k] + b - a], ids[a:b])
        np.testing.assert_array_equal(row["position_ids"][cu[k]:cu[k + 1]], np.arange(seg_lengths[k]))
        assert seg_lengths[k] - (b - a) < max(config.row_multiple, config.segment_multiple)
        assert not row["loss_mask"][cu[k] + b - a - 1:cu[k + 1]].any()  # last token and padding
    assert sum(b - a for a, b in docs) + padding_tokens(row, docs) == T
    assert np.all(row["labels"][row["loss_mask"] == 0] == 0)
    for key in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_kv_padded", "cu_seqlens"):
        np.testing.assert_array_equal(row[key], cu)
    assert row["max_seqlen_q"][0] == row["max_seqlen"][0] == (seg_lengths.max() if len(docs) else 0)
    assert row["cu_seqlens_argmin"][0] == len(cu)


def padding_tokens(row, docs):
    cu = row["cu_seqlens_q_padded"]
    return int(sum(cu[k + 1] - cu[k] - (b - a) for k, (a, b) in enumerate(docs)))


def test_hand_computed_row():
    ids = np.arange(100, 120, dtype=np.uint32)
    indices = np.array([[0, 5], [5, 6], [6, 13], [13, 20]], dtype=np.uint32)
    mask = np.ones(20, dtype=np.uint8)
    mask[8] = 0  # token 108 is not a target
    row = build_row(ids, indices, mask, PackingConfig(cp_size=2))
    # [5, 6) is a 1-token document: dropped. Segments 5 -> 8, 7 -> 8, 7 -> 8 (multiples of 2c = 4).
    np.testing.assert_array_equal(row["cu_seqlens_q"], [0, 8, 16, 24])
    np.testing.assert_array_equal(
        row["tokens"], [100, 101, 102, 103, 104, 0, 0, 0, 106, 107, 108, 109, 110, 111, 112, 0,
                        113, 114, 115, 116, 117, 118, 119, 0])
    np.testing.assert_array_equal(
        row["labels"], [101, 102, 103, 104, 0, 0, 0, 0, 107, 0, 109, 110, 111, 112, 0, 0,
                        114, 115, 116, 117, 118, 119, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], (row["labels"] != 0).astype(np.float32))


def test_no_document_masking_predicts_across_documents():
    ids = np.arange(10, 18, dtype=np.uint32)
    row = build_row(ids, np.array([[0, 3], [3, 8]]), None, PackingConfig(document_masking=False))
    np.testing.assert_array_equal(row["cu_seqlens_q"], [0, 8])
    np.testing.assert_array_equal(row["labels"][:7], np.arange(11, 18))


def test_padding_overhead_under_one_percent_at_cp8_for_prolong_like_documents():
    """64K samples of documents with a long-tailed length distribution (median ~1.5K tokens)."""
    rng = np.random.default_rng(0)
    overheads = []
    for _ in range(20):
        lengths = np.minimum(rng.lognormal(mean=np.log(1500), sigma=1.2, size=400).astype(int) + 2, 65536)
        cut = np.searchsorted(np.cumsum(lengths), 65536)
        lengths = lengths[:cut + 1]
        lengths[-1] -= lengths.sum() - 65536  # the packer clips the last document at the pack length
        lengths = lengths[lengths > 0]
        overheads.append(padding_overhead(lengths, PackingConfig(cp_size=8)))
    assert 0 < np.mean(overheads) < 0.01, np.mean(overheads)
    # exact value on a tiny hand-checked case: 5 -> 16, 16 -> 16, 3 -> 16
    assert padding_overhead(np.array([5, 16, 3]), PackingConfig(cp_size=8)) == pytest.approx((11 + 13) / 24)


def test_instruction_masks_switch():
    """Pretraining stages ignore the `mask` column (as the reference outside SFT); SFT applies it."""
    rng = np.random.default_rng(3)
    ids, indices = random_documents(rng, 64, max_docs=4)
    mask = (rng.random(64) < 0.5).astype(np.uint8)
    off = build_row(ids, indices, mask, PackingConfig(instruction_masks=False))
    plain = build_row(ids, indices, None, PackingConfig())
    on = build_row(ids, indices, mask, PackingConfig())
    np.testing.assert_array_equal(off["loss_mask"], plain["loss_mask"])
    assert on["loss_mask"].sum() < off["loss_mask"].sum()
    assert row_triples(on) == reference_triples(ids, indices, mask)[0]


@pytest.mark.parametrize("config", [PackingConfig(cp_size=8), PackingConfig(cp_size=4, tp_size=2, sequence_parallel=True)],
                         ids=repr)
def test_rows_partition_across_cp_ranks_without_loss(config):
    """Every real token and target lands on exactly one CP rank (the model's TE-equivalent split)."""
    import torch

    from prolong_nemo.model.context_parallel import thd_partition_indices

    rng = np.random.default_rng(5)
    ids, indices = random_documents(rng, 997, max_docs=30)
    row = build_row(ids, indices, None, config)
    T, c = len(row["tokens"]), config.cp_size
    seen = np.zeros(T, dtype=int)
    for rank in range(c):
        idx = thd_partition_indices(torch.from_numpy(row["cu_seqlens_q_padded"]), T, c, rank).numpy()
        assert len(idx) == T // c
        if config.sequence_parallel:
            assert len(idx) % config.tp_size == 0  # sequence parallelism splits each rank's tokens by TP
        seen[idx] += 1
    assert (seen == 1).all()


# ---- masks are unsigned; a target is `mask != 0` with weight 1 (issue 13, item 7) -------------

def test_signed_and_float_masks_are_refused():
    from prolong_nemo.errors import DataError

    ids = np.arange(1, 9, dtype=np.uint32)
    indices = np.array([[0, 8]], dtype=np.uint32)
    for mask in (np.array([0, 1, -1, 1, 0, 1, 1, 1], dtype=np.int8), np.ones(8, dtype=np.float32)):
        with pytest.raises(DataError, match=rf"shard.mds sample 3: mask must be unsigned integers "
                                            rf"\(target = mask != 0\), got {mask.dtype}"):
            build_row(ids, indices, mask, where="shard.mds sample 3")
    with pytest.raises(DataError, match="mask must be unsigned"):  # even where the stage ignores masks
        build_row(ids, indices, mask, PackingConfig(instruction_masks=False))


@pytest.mark.parametrize("big", [np.uint32(4_000_000_000), np.uint8(2), np.uint16(256)], ids=repr)
def test_loss_mask_is_exactly_0_or_1_for_any_nonzero_mask(big):
    rng = np.random.default_rng(7)
    ids, indices = random_documents(rng, 256, max_docs=6)
    on = rng.random(256) < 0.5
    mask = np.where(on, big, 0).astype(big.dtype)
    row = build_row(ids, indices, mask, PackingConfig(cp_size=2))
    assert set(np.unique(row["loss_mask"]).tolist()) <= {0.0, 1.0}
    want = sum(int(on[a + 1:b].sum()) for a, b in indices.astype(int).tolist() if b - a > 1)
    assert int(row["loss_mask"].sum()) == want > 0  # the token count: one per target, no overflow
    same = build_row(ids, indices, on.astype(np.uint8), PackingConfig(cp_size=2))
    for key in ("tokens", "labels", "loss_mask"):
        np.testing.assert_array_equal(row[key], same[key])
