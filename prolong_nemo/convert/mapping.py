"""Hugging Face Llama <-> Megatron-Core GPTModel: names, shapes and the two fused layouts.

Pure torch, no I/O. Megatron names are the TE layer-spec names, which the local spec also
uses in its sharded state dict (megatron-core's local layer spec maps `input_layernorm.` to
`self_attention.linear_qkv.layer_norm_` and `pre_mlp_layernorm.` to `mlp.linear_fc1.layer_norm_`).
Decoder-layer tensors are stored stacked: one dist-checkpoint key per tensor kind, with a
leading layer axis (what `TransformerBlock.sharded_state_dict` requests when layers are
homogeneous), so any TP/PP split of a later run reads its own slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prolong_nemo.errors import ConversionError  # noqa: F401 - re-exported: mapping.ConversionError
from prolong_nemo.model.config import LlamaArch

# Hugging Face Llama-3 tensor dtypes we read and write.
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
}

LAYER_PREFIX = "decoder.layers."
# Dist-checkpoint keys of the model itself (other keys: optimizer state, ...).
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
HF_LAYER_PREFIX = "model.layers."

# TE modules of one decoder layer that carry `_extra_state` (FP8 metadata; empty here).
LAYER_EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# TENorm (an op-fuser RMSNorm in TE 2.x) also has one.
GLOBAL_EXTRA_STATE_MODULES = ("decoder.final_layernorm",)
# Buffers some older HF checkpoints contain; recomputed by the model, never converted.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorMap:
    """One Megatron tensor and the Hugging Face tensor(s) it is made of.

    `mcore` is the dist-checkpoint key (stacked key for layer tensors); `hf` are full HF names
    for global tensors or per-layer suffixes (after `model.layers.<i>.`) for layer tensors.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str  # "copy" | "qkv" | "fc1"
    layered: bool

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        if not self.layered:
            return self.hf
        return tuple(f"{HF_LAYER_PREFIX}{layer}.{s}" for s in self.hf)


LAYER_MAPS: tuple[TensorMap, ...] = (
    TensorMap("decoder.layers.self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), "copy", True),
    TensorMap(
        "decoder.layers.self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
        True,
    ),
    TensorMap("decoder.layers.self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy", True),
    TensorMap("decoder.layers.mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), "copy", True),
    TensorMap("decoder.layers.mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1", True),
    TensorMap("decoder.layers.mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy", True),
)
EMBEDDING = TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy", False)
FINAL_NORM = TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", False)
OUTPUT = TensorMap("output_layer.weight", ("lm_head.weight",), "copy", False)


def global_maps(arch: LlamaArch) -> tuple[TensorMap, ...]:
    """Non-layer tensors; a tied model has no separate output layer."""
    return (EMBEDDING, FINAL_NORM) if arch.tie_word_embeddings else (EMBEDDING, FINAL_NORM, OUTPUT)


# ---------------------------------------------------------------- shapes


def hf_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Expected shape of every Hugging Face tensor (suffix for layer tensors)."""
    h, d = arch.hidden_size, arch.head_dim
    return {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (arch.vocab_size, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
    }


def hf_shape(arch: LlamaArch, name: str) -> tuple[int, ...]:
    """Shape of a full HF tensor name (layer names are looked up by suffix)."""
    shapes = hf_shapes(arch)
    if name.startswith(HF_LAYER_PREFIX):
        name = name.split(".", 3)[3]
    return shapes[name]


def mcore_shape(arch: LlamaArch, tmap: TensorMap) -> tuple[int, ...]:
    """Shape of one Megatron tensor (one layer's slice for layer tensors)."""
    shapes = hf_shapes(arch)
    parts = [shapes[s] for s in tmap.hf]
    if tmap.kind == "copy":
        return parts[0]
    return (sum(p[0] for p in parts), parts[0][1])


# ---------------------------------------------------------------- fused layouts


@dataclass(frozen=True)
class RowBlock:
    """`count` rows starting at row `first` of HF tensor number `part` of a TensorMap."""

    part: int
    first: int
    count: int


def row_blocks(arch: LlamaArch, tmap: TensorMap) -> list[RowBlock]:
    """The rows of the Megatron tensor, in order, as blocks of its HF tensors.

    QKV is interleaved per query group: [q heads of group 0, k0, v0, q heads of group 1, ...],
    so a TP rank owning query groups [a, b) owns one contiguous row block. fc1 is all gate rows
    then all up rows (the SwiGLU factory's global layout, independent of TP).
    """
    shapes = hf_shapes(arch)
    if tmap.kind == "qkv":
        gq, d = arch.num_attention_heads // arch.num_query_groups * arch.head_dim, arch.head_dim
        return [b for g in range(arch.num_query_groups)
                for b in (RowBlock(0, g * gq, gq), RowBlock(1, g * d, d), RowBlock(2, g * d, d))]
    rows = [shapes[s][0] for s in tmap.hf]
    return [RowBlock(i, 0, n) for i, n in enumerate(rows)]
