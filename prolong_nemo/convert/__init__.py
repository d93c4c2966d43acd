"""Llama-3 checkpoints between Hugging Face (safetensors) and Megatron-Core (torch_dist).

Public API:
- `hf_to_megatron(hf_dir, out_root, rope_theta=None, max_position_embeddings=None, ...)`
- `megatron_to_hf(ckpt, out_dir, tokenizer_dir=None, arch=None, ...)`
- `verify(hf_dir, ckpt) -> VerifyResult` (max |logit diff|; imports megatron + transformers)
- `write_run_config(iter_dir, arch)`: record the architecture in a training checkpoint so
  its export carries that checkpoint's rope_theta / max_position_embeddings.
"""

from prolong_nemo.convert.mapping import ConversionError
from prolong_nemo.convert.megatron_io import read_recorded_config, resolve_iter_dir, write_run_config
from prolong_nemo.convert.pipelines import ConversionResult, hf_to_megatron, megatron_to_hf


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
