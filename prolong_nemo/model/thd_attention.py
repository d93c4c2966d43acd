"""Document-masked causal core attention over packed (THD) rows, without Transformer Engine.

megatron-core's local `DotProductAttention` rejects `PackedSeqParams`. This module is a
drop-in `core_attention` for the local layer spec: it attends causally inside each
segment given by cu_seqlens and never across segments. It is the exact CPU reference (and
works on a CUDA machine without TE: each segment runs through torch's SDPA, which picks
the flash / memory-efficient kernel there). Under context parallelism it gathers K/V and
stays exact (cp_attention.py). It has no parameters, so checkpoints are the same as with
the TE spec.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from prolong_nemo.model.cp_attention import cp_packed_causal_attention
from prolong_nemo.model.packed_attention import causal_attention, packed_causal_attention


def segment_bounds(packed_seq_params) -> list[int]:
    """Segment boundaries as Python ints; padded ones, as TE and megatron's THD RoPE use."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    return [int(x) for x in cu.tolist()]


def _cp_group(pg_collection):
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        return pg_collection.cp
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


class ThdDotProductAttention(MegatronModule):
    """Core attention accepting THD (`PackedSeqParams`) and plain SBHD causal inputs."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        # CP > 1 takes the gather-based reference path (cp_attention.py); TE's ring is the fast one.
        self.cp_group = _cp_group(pg_collection) if config.context_parallel_size > 1 else None
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"only causal attention is implemented, got {attn_mask_type}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("attention dropout is not supported (Llama-3 uses none)")
        head_dim = config.kv_channels
        self.scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
        **_: object,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # THD: [T, heads, d] -> [T, heads * d]
            bounds = segment_bounds(packed_seq_params)
            if self.cp_group is not None:
                out = cp_packed_causal_attention(query, key, value, bounds, self.scale, self.cp_group)
            else:
                out = packed_causal_attention(query, key, value, bounds, self.scale)
            return out.reshape(out.size(0), -1)
        if self.cp_group is not None:
            raise ValueError("context parallelism without TE needs packed (THD) batches")
        if attention_mask is not None:
            raise ValueError("explicit attention masks are not supported; pass PackedSeqParams")
        # SBHD: [S, B, heads, d]; every batch row is one causal sequence.
        s, b = query.shape[:2]
        rows = [causal_attention(query[:, i], key[:, i], value[:, i], self.scale) for i in range(b)]
        return torch.stack(rows, dim=1).reshape(s, b, -1)
