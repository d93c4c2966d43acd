"""Exact document-masked causal attention over packed (THD) tensors; torch only.

Shared by megatron's core-attention module (`thd_attention.py`) and the torch-only GPU bench.
Each segment runs through torch's SDPA (flash / memory-efficient kernels on CUDA, exact
math on CPU); nothing attends across a segment boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [L, nq, d], k/v [L, nkv, d] -> [L, nq, d]: causal GQA attention of one segment."""
    group = q.size(1) // k.size(1)
    # Megatron query groups are contiguous blocks of heads: repeat_interleave matches.
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    # [1, heads, L, d]: 4-D so CUDA can pick the flash kernel (3-D inputs may fall back to
    # the math kernel, which materializes L x L scores).
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
    """THD q [T, nq, d], k/v [T, nkv, d]; attention restricted to [bounds[i], bounds[i+1])."""
    if bounds[0] != 0 or bounds[-1] != q.size(0):
        raise ValueError(f"cu_seqlens must run from 0 to T={q.size(0)}, got {bounds[0]}..{bounds[-1]}")
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = causal_attention(q[start:end], k[start:end], v[start:end], scale)
    return out
