"""LlamaArch -> megatron TransformerConfig / GPTModel arguments, layer specs, checkpoint names."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from prolong_nemo.model.config import ROPE_THETA_512K, ROPE_THETA_64K, preset
from prolong_nemo.model.megatron_config import (
    ParallelSizes,
    gpt_model_kwargs,
    llama3_rope_kwargs,
    to_transformer_config,
    transformer_config_kwargs,
)


def test_llama3_8b_transformer_config():
    cfg = to_transformer_config(preset("llama3-8b"), ParallelSizes(tp=1, cp=1))
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (32, 4096, 14336)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (32, 8, 128)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.calculate_per_token_loss and cfg.cross_entropy_fusion_impl == "native"


@pytest.mark.parametrize("theta", [ROPE_THETA_64K, ROPE_THETA_512K])
def test_model_kwargs_per_stage(theta):
    kw = gpt_model_kwargs(preset("llama3-8b", rope_theta=theta), seq_length=65536)
    assert kw["rotary_base"] == theta and kw["vocab_size"] == 128256
    assert kw["share_embeddings_and_output_weights"] is False and kw["position_embedding_type"] == "rope"
    assert kw["max_sequence_length"] == 65536 and kw["rope_scaling"] is False


def test_rope_scaling_llama31_accepted_others_rejected():
    ok = preset("llama3-8b", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert llama3_rope_kwargs(ok) == {"rope_scaling": True, "rope_scaling_factor": 8.0}
    for bad in ({"rope_type": "yarn", "factor": 4.0}, {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}):
        with pytest.raises(ValueError):
            llama3_rope_kwargs(preset("llama3-8b", rope_scaling=bad))


def test_parallel_and_fusion_settings_flow_through():
    from prolong_nemo.model.megatron_config import RuntimeOptions

    kw = transformer_config_kwargs(
        preset("llama3-8b"), ParallelSizes(tp=4, pp=2, cp=4, sequence_parallel=True),
        RuntimeOptions(params_dtype=torch.bfloat16, fusions=True, recompute_layers=True),
    )
    assert (kw["tensor_model_parallel_size"], kw["pipeline_model_parallel_size"], kw["context_parallel_size"]) == (4, 2, 4)
    assert kw["sequence_parallel"] and kw["bf16"] and kw["cross_entropy_loss_fusion"]
    assert kw["recompute_granularity"] == "full" and kw["recompute_num_layers"] == 1


def test_layer_specs():
    from prolong_nemo.model.builder import layer_spec, resolve_backend, te_available
    from prolong_nemo.model.thd_attention import ThdDotProductAttention

    spec = layer_spec("local")
    assert spec.submodules.self_attention.submodules.core_attention is ThdDotProductAttention
    if not te_available():
        assert resolve_backend("auto") == "local"
        with pytest.raises(RuntimeError):
            resolve_backend("te")


def test_local_spec_checkpoint_uses_te_names():
    """One dist checkpoint serves both specs: the local norms map to TE's fused names."""
    from model_fixtures import init_megatron_single_process, tiny_arch

    from prolong_nemo.model.builder import build_gpt_model

    init_megatron_single_process()
    keys = {v.key for v in build_gpt_model(tiny_arch(), 64, backend="local").sharded_state_dict().values()}
    expected = {
        "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.self_attention.linear_qkv.weight",
        "decoder.layers.self_attention.linear_proj.weight", "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight",
    }
    assert expected <= keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


@pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None, reason="Megatron-Bridge not installed")
def test_bridge_provider_matches_transformer_config():
    from prolong_nemo.model.megatron_config import to_bridge_provider

    arch = preset("llama3-8b", rope_theta=ROPE_THETA_64K)
    provider = to_bridge_provider(arch, seq_length=65536)
    cfg = to_transformer_config(arch)
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups", "layernorm_epsilon"):
        assert getattr(provider, name) == getattr(cfg, name)
    assert provider.rotary_base == ROPE_THETA_64K and provider.seq_length == 65536


def test_bridge_provider_kwargs_are_gpt_model_provider_fields():
    """Checked statically against Megatron-Bridge's source (pinned copy, when present)."""
    import ast
    import dataclasses
    import os
    from pathlib import Path

    from megatron.core.transformer.transformer_config import TransformerConfig

    from prolong_nemo.model.megatron_config import bridge_provider_kwargs

    site = Path(os.environ.get("PROLONG_BRIDGE_SITE", Path(__file__).resolve().parents[1] / ".venv/extras/bridge"))
    source = site / "megatron/bridge/models/gpt_provider.py"
    if not source.is_file():
        pytest.skip("Megatron-Bridge source not available")
    tree = ast.parse(source.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "GPTModelProvider")
    own = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    known = own | {f.name for f in dataclasses.fields(TransformerConfig)}
    kwargs = bridge_provider_kwargs(preset("llama3-8b", rope_theta=ROPE_THETA_64K), 65536, layer_spec=object())
    assert set(kwargs) <= known, set(kwargs) - known
    assert kwargs["rotary_base"] == ROPE_THETA_64K and kwargs["seq_length"] == 65536
    assert kwargs["share_embeddings_and_output_weights"] is False and kwargs["num_query_groups"] == 8
