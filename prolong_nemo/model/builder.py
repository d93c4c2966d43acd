"""Build the Llama-3 megatron-core GPTModel with the right layer spec for the machine.

- "te": Transformer Engine layer spec; fused attention (cuDNN / flash) handles THD.
- "local": megatron-core's local spec with `ThdDotProductAttention` as core attention
  (exact document masking, no TE needed). Same parameter and checkpoint names as "te".
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from prolong_nemo.model.config import LlamaArch
from prolong_nemo.model.megatron_config import (
    ParallelSizes,
    RuntimeOptions,
    gpt_model_kwargs,
    to_transformer_config,
)

Backend = Literal["auto", "te", "local"]


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: Backend) -> Literal["te", "local"]:
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise RuntimeError("attention backend 'te' requested but Transformer Engine is not installed")
    return backend


def layer_spec(backend: Backend = "auto"):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_backend(backend) == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    from prolong_nemo.model.thd_attention import ThdDotProductAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ThdDotProductAttention
    return spec


def build_gpt_model(
    arch: LlamaArch,
    seq_length: int,
    *,
    parallel: ParallelSizes = ParallelSizes(),
    runtime: RuntimeOptions = RuntimeOptions(),
    backend: Backend = "auto",
    pre_process: bool = True,
    post_process: bool = True,
):
    """A megatron-core GPTModel for `arch`. Model-parallel state must be initialized."""
    from megatron.core.models.gpt import GPTModel

    config = to_transformer_config(arch, parallel, runtime)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(backend),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        **gpt_model_kwargs(arch, seq_length),
    )
