"""The FLOP cost model (prolong_nemo/model/flops.py) against independent counts, and the
mixture length statistics it is fed with (prolong_nemo/data/length_stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from data_fixtures import write_random_domain
from torch.utils.flop_counter import FlopCounterMode

from prolong_nemo.data.length_stats import (
    SHORT_DOCS,
    default_length_stats,
    length_stats,
    mixture_length_stats,
    sample_moments,
    short_doc_ratio,
)
from prolong_nemo.model.config import preset
from prolong_nemo.model.flops import (
    Flops,
    attention_flops_from_moments,
    dense_flops_per_token,
    flops_per_token,
    forward_flops,
    forward_flops_from_moments,
    layer_gemm_weights,
    lengths_from_cu_seqlens,
    lm_head_flops_per_token,
    sample_cost,
    training_flops,
)

L3 = preset("llama3-8b")
TINY = preset("llama3-tiny")


# ---------------------------------------------------------------------------------------------
# Hand counts for Llama-3-8B
# ---------------------------------------------------------------------------------------------
def test_llama3_8b_terms_by_hand():
    # per layer: q 4096x4096, k and v 4096x1024 each, o 4096x4096, gate/up/down 4096x14336
    per_layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336
    assert layer_gemm_weights(L3) == per_layer == 218_103_808  # plan.layer_params minus 2 norms
    assert dense_flops_per_token(L3) == 2 * 32 * 218_103_808 == 13_958_643_712
    assert lm_head_flops_per_token(L3) == 2 * 4096 * 128256 == 1_050_673_152
    # one 64K document, causal: 32 layers x 4 x 128 x 32 heads x 65536*65537/2 pairs
    f = forward_flops(L3, [65536])
    assert f.attention == 32 * 4 * 128 * 32 * (65536 * 65537 // 2)
    assert f.dense == 65536 * 13_958_643_712 and f.lm_head == 65536 * 1_050_673_152
    assert f.dominant == "attention" and f.shares()["attention"] == pytest.approx(0.534, abs=1e-3)
    # the same tokens as 32 documents of 2,048: attention 32x smaller, dense dominates
    short = forward_flops(L3, [2048] * 32)
    assert short.attention == pytest.approx(f.attention * (2048 + 1) / (65536 + 1))
    assert short.dense == f.dense and short.dominant == "dense"


def test_training_is_three_forwards_plus_recompute():
    lengths = [3000, 62536]
    fwd = forward_flops(L3, lengths)
    assert training_flops(L3, lengths) == 3 * fwd
    assert sample_cost(L3, lengths) == pytest.approx(3 * fwd.total)
    full = training_flops(L3, lengths, recompute="full")
    assert full == Flops(4 * fwd.dense, 4 * fwd.attention, 3 * fwd.lm_head)
    selective = training_flops(L3, lengths, recompute="selective", lm_head_recompute=True)
    assert selective == Flops(3 * fwd.dense, 4 * fwd.attention, 4 * fwd.lm_head)
    with pytest.raises(ValueError):
        training_flops(L3, lengths, recompute="some")


def test_sample_cost_is_linear_in_its_moments():
    # the balancer adds costs of samples on one rank: cost(a + b docs) = cost(a) + cost(b)
    a, b = [100, 2000, 7], [65536]
    assert sample_cost(L3, a + b) == pytest.approx(sample_cost(L3, a) + sample_cost(L3, b))
    assert lengths_from_cu_seqlens([0, 100, 2100, 2107]) == [100, 2000, 7]
    assert sample_cost(L3, lengths_from_cu_seqlens([0, 100, 2100, 2107])) == sample_cost(L3, a)
    assert sample_cost(L3, []) == 0.0
    with pytest.raises(ValueError):
        lengths_from_cu_seqlens([0, 5, 3])
    with pytest.raises(ValueError):
        sample_cost(L3, [4, -1])
    t, s = 65536.0, 3 * 2048.0 ** 2 + 59392.0 ** 2
    assert flops_per_token(L3, t, s) * t == pytest.approx(sample_cost(L3, [2048] * 3 + [59392]))


# ---------------------------------------------------------------------------------------------
# Independent counts: torch's FLOP counter
# ---------------------------------------------------------------------------------------------
def _hf_llama(arch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
                         num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_query_groups, vocab_size=arch.vocab_size,
                         max_position_embeddings=512, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_hugging_face_llama_forward_and_backward_match_the_counter():
    """Eager attention computes the full [T, T] score matrix (masked afterwards), so the counter
    sees `causal=False` attention; the GEMMs must match exactly, forward and backward."""
    model, T = _hf_llama(TINY), 96
    ids = torch.randint(0, TINY.vocab_size, (1, T))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    rope = by_module["LlamaForCausalLM.model.rotary_emb"]  # RoPE's [d/2] x [T] frequency outer product
    assert rope == TINY.head_dim * T  # elementwise-sized work this model leaves out
    ours = forward_flops_from_moments(TINY, T, T * T)
    full_attention = attention_flops_from_moments(TINY, T, T * T, causal=False)
    assert by_module["LlamaForCausalLM.lm_head"] == ours.lm_head
    layers = sum(by_module[f"LlamaForCausalLM.model.layers.{i}"] for i in range(TINY.num_layers))
    assert layers == ours.dense + full_attention
    assert counter.get_total_flops() == ours.dense + full_attention + ours.lm_head + rope

    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    # backward = 2 x forward for every GEMM (RoPE's position ids carry no gradient)
    assert counter.get_total_flops() == 3 * (ours.dense + full_attention + ours.lm_head) + rope


def test_causal_attention_per_document_matches_the_counter():
    """Attention computed query by query over its own document's earlier tokens only: the
    counter sees exactly the causal, document-masked work."""
    lengths, heads, d = [5, 1, 12, 30, 2], 4, 16
    arch = TINY.replace(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=2)
    gen = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as causal:
        for n in lengths:
            q, k, v = (torch.randn(heads, n, d, generator=gen) for _ in range(3))
            for i in range(n):
                p = torch.softmax(q[:, i:i + 1] @ k[:, :i + 1].transpose(1, 2) / math.sqrt(d), dim=-1)
                p @ v[:, :i + 1]
    tokens, sum_sq = sum(lengths), sum(n * n for n in lengths)
    assert causal.get_total_flops() == attention_flops_from_moments(arch, tokens, sum_sq)
    assert forward_flops(arch, lengths).attention == causal.get_total_flops()
    # the mask a document-masked causal kernel applies has the same number of (query, key) pairs
    cu = np.cumsum([0] + lengths)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(cu[-1])
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    assert 4 * d * heads * int(allowed.sum()) == causal.get_total_flops()

    with FlopCounterMode(display=False) as dense:  # full attention within each document
        for n in lengths:
            q, k, v = (torch.randn(heads, n, d, generator=gen) for _ in range(3))
            torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    assert dense.get_total_flops() == attention_flops_from_moments(arch, tokens, sum_sq, causal=False)


# ---------------------------------------------------------------------------------------------
# Length statistics of a mixture
# ---------------------------------------------------------------------------------------------
def test_default_distributions_per_stage():
    ratio = short_doc_ratio()
    lengths = np.arange(SHORT_DOCS[0], SHORT_DOCS[1] + 1, dtype=np.float64)
    assert ratio == pytest.approx((lengths ** 2).mean() / lengths.mean(), rel=1e-3)  # 2,867 tokens
    assert round(ratio) == 2867
    s64 = default_length_stats("64k", 65536)
    assert s64.source == "default" and s64.tokens == 65536
    assert s64.sum_sq == pytest.approx(0.6 * 65536 ** 2 + 0.4 * 65536 * ratio)
    s512 = default_length_stats("512k", 524288)
    assert s512.sum_sq == pytest.approx(524288 * (0.2 * 524288 + 0.4 * 65536 + 0.4 * ratio))
    assert default_length_stats("sft", 65536).mean_doc_length == pytest.approx(ratio)
    assert default_length_stats("64k", 65536, document_masking=False).sum_sq == 65536 ** 2
    assert "60% 64K docs, 40% short 1-4K docs" in s64.detail


def _expected(samples):
    moments = np.array([sample_moments(len(s["input_ids"]), s["indices"]) for s in samples], dtype=np.float64)
    return moments.mean(axis=0)


def test_mixture_statistics_from_the_data(tmp_path):
    long = write_random_domain(tmp_path / "long", 6, 4096, seed=1, max_docs=2)
    short = write_random_domain(tmp_path / "short", 6, 4096, seed=2, max_docs=40)
    domains = [(str(tmp_path / "long"), 0.6), (str(tmp_path / "short"), 0.4)]
    stats = mixture_length_stats(domains, max_samples=100)  # reads every sample of both
    (t_long, s_long), (t_short, s_short) = _expected(long), _expected(short)
    assert stats.source == "data" and stats.samples_read == 12
    assert stats.tokens == pytest.approx(0.6 * t_long + 0.4 * t_short)
    assert stats.sum_sq == pytest.approx(0.6 * s_long + 0.4 * s_short)
    # a bounded read: 2 samples per domain at least, evenly spaced
    few = mixture_length_stats(domains, max_samples=4)
    assert few.samples_read == 2 + 2
    # without document masking every sample is one segment
    whole = mixture_length_stats(domains, max_samples=100, document_masking=False)
    assert whole.sum_sq == pytest.approx(4096.0 ** 2)
    # a missing domain: the stage's default, saying why
    missing = length_stats(domains + [(str(tmp_path / "absent"), 0.1)], stage="64k", sequence_length=4096)
    assert missing.source == "default" and "absent" in missing.detail and "does not exist" in missing.detail
    assert length_stats(domains, stage="64k", sequence_length=4096).source == "data"


def test_sample_cost_takes_arrays_as_the_balancer_passes_them():
    import functools

    cost = functools.partial(sample_cost, L3)
    lengths = np.array([4096, 1, 60000, 1439], dtype=np.int64)
    assert cost(lengths) == sample_cost(L3, lengths.tolist()) == sample_cost(L3, iter(lengths.tolist()))
