"""Exact document-masked causal attention under context parallelism, without TE.

A reference, not a fast path: every CP rank all-gathers K and V of the whole row, puts them
back in row order with the per-document partition of `context_parallel.py`, and attends its
local queries (chunks r and 2c-1-r of every segment) to the keys of the same segment at
positions <= the query's global position. TE's ring attention computes the same thing
without gathering; this version lets CP > 1 run and be checked on CPU (gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from prolong_nemo.model.context_parallel import thd_partition_indices


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the full gradient and keeps own rows.

    (all_reduce instead of reduce_scatter: gloo has no reduce_scatter.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.size(0)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_full_row(x: Tensor, cu_padded: Tensor, total: int, group) -> Tensor:
    """Local CP rows [T/c, ...] -> the whole row [T, ...] in original token order."""
    size = dist.get_world_size(group)
    order = torch.cat([thd_partition_indices(cu_padded, total, size, r) for r in range(size)])
    gathered = _AllGatherRows.apply(x, group)
    return gathered[torch.argsort(order.to(x.device))]


def cp_packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float, group) -> Tensor:
    """q/k/v: this rank's THD tokens; bounds: GLOBAL padded cu_seqlens. Returns [T/c, nq, d]."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    cu = torch.tensor(bounds, dtype=torch.int64)
    total = bounds[-1]
    k_full = gather_full_row(k, cu, total, group)
    v_full = gather_full_row(v, cu, total, group)
    q_pos = thd_partition_indices(cu, total, size, rank).to(q.device)
    group_size = q.size(1) // k.size(1)
    out = torch.empty_like(q)
    row = 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = (end - start) // size  # this rank's tokens of the segment (two chunks)
        if n == 0:
            continue
        keys = torch.arange(start, end, device=q.device)
        mask = keys[None, :] <= q_pos[row : row + n, None]  # causal by global position
        ks = k_full[start:end].repeat_interleave(group_size, dim=1).transpose(0, 1)
        vs = v_full[start:end].repeat_interleave(group_size, dim=1).transpose(0, 1)
        attn = F.scaled_dot_product_attention(q[row : row + n].transpose(0, 1), ks, vs, attn_mask=mask, scale=scale)
        out[row : row + n] = attn.transpose(0, 1)
        row += n
    return out
