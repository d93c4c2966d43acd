"""Llama-3 checkpoints between Hugging Face (safetensors) and Megatron-Core (torch_dist).

Public API:
- `hf_to_megatron(hf_dir, out_root, rope_theta=None, max_position_embeddings=None, ...)`
- `megatron_to_hf(ckpt, out_dir, tokenizer_dir=None, arch=None, ...)`
- `verify(hf_dir, ckpt) -> VerifyResult` (max |logit diff|; imports megatron + transformers)
- `write_run_config(iter_dir, arch)`: record the architecture in a training checkpoint so
  its export carries that checkpoint's rope_theta / max_position_embeddings.
"""

import importlib

from prolong_nemo.errors import ConversionError

# Imported on first use (PEP 562): the converters import torch, which `prolong-nemo convert
# --help` and `from prolong_nemo.convert import ConversionError` do not need.
_LAZY = {"ConversionResult": "pipelines", "hf_to_megatron": "pipelines", "megatron_to_hf": "pipelines",
         "read_recorded_config": "megatron_io", "resolve_iter_dir": "megatron_io", "write_run_config": "megatron_io"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def verify(hf_dir, ckpt, tokens=None):
    """See `prolong_nemo.convert.verify.verify` (lazy: needs megatron-core and transformers)."""
    from prolong_nemo.convert.verify import verify as _verify

    return _verify(hf_dir, ckpt, tokens)


__all__ = [
    "ConversionError",
    "ConversionResult",
    "hf_to_megatron",
    "megatron_to_hf",
    "read_recorded_config",
    "resolve_iter_dir",
    "verify",
    "write_run_config",
]
