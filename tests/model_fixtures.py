"""Shared helpers for the model / loss / training tests (not a conftest: plain imports)."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch

from prolong_nemo.model.config import LlamaArch, preset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron_single_process(seed: int = 1234) -> None:
    """gloo world of one, TP=PP=CP=1, CPU patches; idempotent within a pytest process."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from prolong_nemo.cpu_compat import apply_cpu_patches

    apply_cpu_patches(force=True)  # CPU models, even where CUDA exists
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(seed)


def tiny_arch(**changes) -> LlamaArch:
    return preset("llama3-tiny", **changes)


def make_row(doc_lengths: list[int], vocab: int, seed: int = 0, cp_size: int = 1) -> dict[str, np.ndarray]:
    """A contract row of random documents, through the data adapter's own `build_row`."""
    from prolong_nemo.data.packing import PackingConfig, build_row

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=sum(doc_lengths)).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(doc_lengths)])
    indices = np.stack([bounds[:-1], bounds[1:]], axis=1)
    return build_row(ids, indices, None, PackingConfig(cp_size=cp_size))


def collate_row(row: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    from prolong_nemo.data.dataset import collate

    return collate([row])


# ---- Hugging Face <-> megatron (local spec names) for parity tests -------------------------


def hf_llama(arch: LlamaArch, seed: int = 0, std: float = 0.05):
    """A randomly initialized HF LlamaForCausalLM with `arch` (eager attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, rms_norm_eps=arch.norm_eps, rope_theta=arch.rope_theta,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=arch.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, initializer_range=std, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms so a dropped/misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_to_megatron_local(hf_model, arch: LlamaArch) -> dict[str, torch.Tensor]:
    sd = hf_model.state_dict()
    nq, nkv, d, h = arch.num_attention_heads, arch.num_query_groups, arch.head_dim, arch.hidden_size
    g = nq // nkv
    out = {
        "embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
        "output_layer.weight": sd["lm_head.weight"],
    }
    for i in range(arch.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(nkv, g * d, h)
        k = sd[p + "self_attn.k_proj.weight"].view(nkv, d, h)
        v = sd[p + "self_attn.v_proj.weight"].view(nkv, d, h)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h)
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], dim=0
        )
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def load_megatron_weights(model, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    real_missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not real_missing and not unexpected, (real_missing, unexpected)
