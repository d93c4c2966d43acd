"""Our megatron-core Llama-3 vs Hugging Face LlamaForCausalLM, and packed THD vs per-document."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import (
    collate_row,
    hf_llama,
    hf_to_megatron_local,
    init_megatron_single_process,
    load_megatron_weights,
    make_row,
    tiny_arch,
)
from prolong_nemo.model.config import ROPE_THETA_512K, ROPE_THETA_64K, ROPE_THETA_LLAMA3

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_megatron_single_process()


def build_pair(rope_theta: float, seq_length: int = 512):
    from prolong_nemo.model.builder import build_gpt_model

    arch = tiny_arch(rope_theta=rope_theta)
    hf = hf_llama(arch)
    model = build_gpt_model(arch, seq_length, backend="local").eval()
    load_megatron_weights(model, hf_to_megatron_local(hf, arch))
    return arch, hf, model


@pytest.mark.parametrize("rope_theta", [ROPE_THETA_LLAMA3, ROPE_THETA_64K, ROPE_THETA_512K])
def test_matches_hugging_face_logits(rope_theta):
    arch, hf, model = build_pair(rope_theta)
    torch.manual_seed(1)
    ids = torch.randint(0, arch.vocab_size, (2, 160))
    pos = torch.arange(ids.size(1)).expand_as(ids)
    with torch.no_grad():
        ours = model(ids, pos, None)
        ref = hf(ids).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, diff
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_rope_theta_changes_the_model():
    """Guard: the parity above would pass trivially if rope_theta were ignored."""
    _, hf_a, model = build_pair(ROPE_THETA_64K)
    _, hf_b, _ = build_pair(ROPE_THETA_512K)
    ids = torch.randint(0, 512, (1, 128))
    with torch.no_grad():
        ours = model(ids, torch.arange(128)[None], None)
        assert (ours - hf_b(ids).logits).abs().max() > 1e-3
        assert (ours - hf_a(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("rope_theta", [ROPE_THETA_64K, ROPE_THETA_512K])
def test_packed_thd_equals_each_document_alone_and_hf(rope_theta):
    from prolong_nemo.training.forward_step import packed_seq_params

    arch, hf, model = build_pair(rope_theta)
    lengths = [37, 1, 90, 5, 64]  # includes a 1-token document (dropped by the packer)
    row = make_row(lengths, arch.vocab_size, seed=3)
    batch = collate_row(row)
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed_seq_params(batch))
    cu = batch["cu_seqlens_q_padded"][0].tolist()
    assert len(cu) - 1 == 4
    for a, b in zip(cu[:-1], cu[1:]):
        doc = batch["tokens"][:, a:b]
        with torch.no_grad():
            alone = model(doc, torch.arange(b - a)[None], None)
            ref = hf(doc).logits
        assert (packed[:, a:b] - alone).abs().max().item() <= TOL
        assert (packed[:, a:b] - ref).abs().max().item() <= TOL


def test_packed_thd_with_cp_tail_padding_keeps_real_tokens_exact():
    """Rows padded for CP (pad inside each segment's tail) give the same real-token logits."""
    from prolong_nemo.training.forward_step import packed_seq_params

    arch, hf, model = build_pair(ROPE_THETA_64K)
    lengths = [13, 30, 7]
    batch = collate_row(make_row(lengths, arch.vocab_size, seed=5, cp_size=4))
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed_seq_params(batch))
    cu = batch["cu_seqlens_q_padded"][0].tolist()
    assert all((b - a) % 8 == 0 for a, b in zip(cu[:-1], cu[1:]))
    for (a, _), n in zip(zip(cu[:-1], cu[1:]), lengths):
        doc = batch["tokens"][:, a : a + n]
        with torch.no_grad():
            ref = hf(doc).logits
        assert (packed[:, a : a + n] - ref).abs().max().item() <= TOL


def test_single_document_row_matches_hf():
    """max_seqlen == T: megatron's THD RoPE takes its 'packed freqs' branch here."""
    from prolong_nemo.training.forward_step import packed_seq_params

    arch, hf, model = build_pair(ROPE_THETA_512K)
    batch = collate_row(make_row([96], arch.vocab_size, seed=8))
    assert int(batch["max_seqlen_q"][0]) == batch["tokens"].size(1)
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed_seq_params(batch))
        ref = hf(batch["tokens"]).logits
    assert (packed - ref).abs().max().item() <= TOL
