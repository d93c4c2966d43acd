"""LlamaArch -> megatron-core `TransformerConfig` and Megatron-Bridge model provider.

Both come from one keyword dictionary (`transformer_config_kwargs`), so the CPU runner's
plain megatron-core model and the Megatron-Bridge provider can never disagree on the
architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from prolong_nemo.model.config import LlamaArch


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False


@dataclass(frozen=True)
class RuntimeOptions:
    """Settings that depend on the machine/run rather than on the architecture."""

    params_dtype: torch.dtype = torch.float32
    use_cpu_initialization: bool = True
    # Fused kernels need CUDA (and some TE); off on CPU.
    fusions: bool = False
    recompute_layers: bool = False
    init_method_std: float = 0.02


def llama3_rope_kwargs(arch: LlamaArch) -> dict[str, Any]:
    """megatron-core only knows Llama-3.1 scaling with its fixed defaults: accept exactly that."""
    scaling = arch.rope_scaling
    if not scaling:
        return {"rope_scaling": False}
    kind = scaling.get("rope_type", scaling.get("type"))
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    mismatched = {k: scaling[k] for k in fixed if k in scaling and float(scaling[k]) != fixed[k]}
    if kind != "llama3" or mismatched:
        raise ValueError(f"rope_scaling {scaling} is not supported by megatron-core RotaryEmbedding")
    return {"rope_scaling": True, "rope_scaling_factor": float(scaling.get("factor", 8.0))}


def transformer_config_kwargs(
    arch: LlamaArch, parallel: ParallelSizes = ParallelSizes(), runtime: RuntimeOptions = RuntimeOptions()
) -> dict[str, Any]:
    dtype = runtime.params_dtype
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=runtime.init_method_std,
        # ProLong: loss averaged over all target tokens of the global batch.
        calculate_per_token_loss=True,
        cross_entropy_loss_fusion=runtime.fusions,
        cross_entropy_fusion_impl="native",
        bias_activation_fusion=runtime.fusions,
        masked_softmax_fusion=False,
        bias_dropout_fusion=runtime.fusions,
        apply_rope_fusion=runtime.fusions,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=runtime.use_cpu_initialization,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
    )
    if runtime.recompute_layers:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return kwargs


def gpt_model_kwargs(arch: LlamaArch, seq_length: int) -> dict[str, Any]:
    """The GPTModel constructor arguments that are not part of TransformerConfig."""
    return dict(
        vocab_size=arch.vocab_size,
        max_sequence_length=seq_length,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rotary_percent=1.0,
        **llama3_rope_kwargs(arch),
    )


def to_transformer_config(
    arch: LlamaArch, parallel: ParallelSizes = ParallelSizes(), runtime: RuntimeOptions = RuntimeOptions()
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(arch, parallel, runtime))


def bridge_provider_kwargs(
    arch: LlamaArch,
    seq_length: int,
    parallel: ParallelSizes = ParallelSizes(),
    runtime: RuntimeOptions = RuntimeOptions(use_cpu_initialization=False, fusions=True),
    layer_spec: Any = None,
) -> dict[str, Any]:
    """Keyword arguments of Megatron-Bridge's `GPTModelProvider` (TransformerConfig + GPT fields)."""
    model = gpt_model_kwargs(arch, seq_length)
    kwargs = transformer_config_kwargs(arch, parallel, runtime)
    kwargs.update(
        vocab_size=model["vocab_size"],
        seq_length=seq_length,
        share_embeddings_and_output_weights=model["share_embeddings_and_output_weights"],
        position_embedding_type="rope",
        rotary_base=model["rotary_base"],
        rotary_percent=1.0,
        rope_scaling=model["rope_scaling"],
        make_vocab_size_divisible_by=128,
    )
    if "rope_scaling_factor" in model:
        kwargs["rope_scaling_factor"] = model["rope_scaling_factor"]
    if layer_spec is not None:
        kwargs["transformer_layer_spec"] = layer_spec
    return kwargs


def to_bridge_provider(
    arch: LlamaArch,
    seq_length: int,
    parallel: ParallelSizes = ParallelSizes(),
    runtime: RuntimeOptions = RuntimeOptions(use_cpu_initialization=False, fusions=True),
    layer_spec: Any = None,
):
    """A Megatron-Bridge `GPTModelProvider` (a TransformerConfig subclass) for the same model.

    Only importable where Megatron-Bridge is installed (NGC containers).
    """
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    return GPTModelProvider(**bridge_provider_kwargs(arch, seq_length, parallel, runtime, layer_spec))
