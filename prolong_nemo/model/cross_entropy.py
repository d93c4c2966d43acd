"""Memory-efficient LM head + cross-entropy: token chunks with recomputation.

The [tokens x vocab] logits never exist whole: forward keeps only the per-token log-sum-exp;
backward recomputes each chunk's logits, turns them into the softmax gradient in place and
accumulates the hidden and weight gradients. At most one [chunk x vocab/tp] fp32 buffer (plus
the matmul output in the compute dtype) is alive at a time, besides the weight gradient itself:
an fp32 [vocab/tp x hidden] accumulator, which under megatron's DDP is the weight's own
`main_grad` (no extra memory). Each chunk's weight gradient is added into it in fp32, with no
[vocab/tp x hidden] temporary (see `_accumulate_weight_grad`). ProLong uses chunks of 2,048.

Vocabulary parallel: the weight holds rows [vocab_start, vocab_start + V/tp); max,
sum-of-exp and the target logit are all-reduced over the TP group, exactly as megatron's
`vocab_parallel_cross_entropy`. The caller routes `hidden` through megatron's TP region
mapping so the hidden gradient is all-reduced (or reduce-scattered under sequence parallel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 2048


@dataclass(frozen=True)
class VocabShard:
    """Which vocabulary rows this rank's output weight holds, and the TP group to reduce over."""

    start: int = 0
    group: dist.ProcessGroup | None = None

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t


def _local_targets(labels: Tensor, shard: VocabShard, local_vocab: int) -> tuple[Tensor, Tensor]:
    local = labels - shard.start
    valid = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), valid


def _chunk_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    return (hidden @ weight.t()).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, shard: VocabShard) -> Tensor:
        n, local_vocab = hidden.size(0), weight.size(0)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = _chunk_logits(hidden[s : s + chunk], weight)
            idx, valid = _local_targets(labels[s : s + chunk], shard, local_vocab)
            tgt = logits.gather(1, idx[:, None]).squeeze(1) * valid
            row_max = shard.all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX)
            sum_exp = shard.all_reduce(logits.sub_(row_max[:, None]).exp_().sum(dim=1))
            lse[s : s + chunk] = sum_exp.log_() + row_max
            target[s : s + chunk] = shard.all_reduce(tgt)
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.shard = chunk, shard
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk, shard = ctx.chunk, ctx.shard
        local_vocab = weight.size(0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = _weight_grad_accumulator(weight)
        grad_loss = grad_loss.float()
        for s in range(0, hidden.size(0), chunk):
            h = hidden[s : s + chunk]
            g = _chunk_logits(h, weight)  # recompute; becomes the logits gradient in place
            g.sub_(lse[s : s + chunk, None]).exp_()
            idx, valid = _local_targets(labels[s : s + chunk], shard, local_vocab)
            rows = torch.arange(g.size(0), device=g.device)
            g[rows[valid], idx[valid]] -= 1.0
            g.mul_(grad_loss[s : s + chunk, None])
            g_low = g.to(hidden.dtype)  # g itself if hidden is fp32
            torch.matmul(g_low, weight, out=grad_hidden[s : s + chunk])
            _accumulate_weight_grad(grad_weight, g, g_low, h)
            del g, g_low
        return grad_hidden, _finish_weight_grad(weight, grad_weight), None, None, None


def _accumulate_weight_grad(acc: Tensor, g: Tensor, g_low: Tensor, h: Tensor) -> None:
    """acc += g.T @ h: one chunk's weight gradient, added in the accumulator's dtype (fp32).

    g is the chunk's fp32 logits gradient, g_low the same in the compute dtype (bf16). The
    product must not pass through a bf16 [V/tp x H] GEMM output: that rounds every chunk's
    contribution before the fp32 sum, an error that grows with the number of chunks (64K
    tokens = 32 chunks) and that megatron's own wgrad avoids (`wgrad_gemm_accum_fp32`). Where
    torch has a bf16 GEMM with fp32 output (CUDA: `addmm(..., out_dtype=float32)`) the GEMM
    accumulates straight into acc at bf16 speed; elsewhere (CPU in torch 2.14) an fp32 GEMM of
    the fp32 g and an fp32 copy of h, [chunk x H]. No [V/tp x H] temporary either way.
    """
    if g_low.dtype == acc.dtype:
        acc.addmm_(g_low.t(), h)
    elif _has_gemm_into(acc.dtype, h.dtype, h.device.type):
        torch.addmm(acc, g_low.t(), h, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(g.to(acc.dtype).t(), h.to(acc.dtype))


@functools.cache
def _has_gemm_into(acc_dtype: torch.dtype, dtype: torch.dtype, device_type: str) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)` with a, b in `dtype`
    works in place on this device and keeps the sum in acc's precision. Probed once: the
    overload exists only on some backends (CUDA, not CPU in torch 2.14) and its dtype checks
    changed across torch versions."""
    try:
        acc = torch.full((2, 2), 1.0 + 2.0**-10, dtype=acc_dtype, device=device_type)
        ones = torch.ones(2, 2, dtype=dtype, device=device_type)
        torch.addmm(acc, ones, ones, out_dtype=acc_dtype, out=acc)
        return bool((acc == 3.0 + 2.0**-10).all())  # 3 + 2^-10 is not a bf16 number
    except (RuntimeError, NotImplementedError, TypeError):  # also: no values on "meta"
        return False


def _weight_grad_accumulator(weight: Tensor) -> Tensor:
    """Where the chunks' weight gradients add up, in fp32.

    Under megatron's DDP the weight carries an fp32 `main_grad` buffer; accumulating straight
    into it (megatron's gradient-accumulation-fusion protocol, as its own linear layers do)
    saves a separate [V/tp x H] fp32 accumulator and the final cast copy: 3 GB at 8B width.
    """
    if getattr(weight, "main_grad", None) is not None and hasattr(weight, "grad_added_to_main_grad"):
        return weight.main_grad
    return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)


def _finish_weight_grad(weight: Tensor, accumulated: Tensor) -> Tensor:
    if accumulated is getattr(weight, "main_grad", None):
        # Tell megatron's DDP hook the gradient is already in main_grad (it then skips adding
        # .grad); autograd still needs a tensor of the weight's shape, which it discards.
        # With `zero_out_wgrad` DDP adds .grad anyway, so it must then be zeros.
        weight.grad_added_to_main_grad = True
        make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
        return make(weight.shape, dtype=weight.dtype, device=weight.device)
    return accumulated.to(weight.dtype)


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard: VocabShard = VocabShard(),
) -> Tensor:
    """Per-token loss (fp32, shape of labels) of softmax(hidden @ weight.T) against labels.

    hidden [..., H] and labels [...] with matching leading dims; weight [V_local, H].
    There is no ignore index: a label outside the vocabulary (e.g. -100) gets the loss
    log-sum-exp (target logit 0), as in megatron's `vocab_parallel_cross_entropy`; targets
    are selected by the loss mask (batch contract: label 0, loss_mask 0).
    """
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    lead = labels.shape
    flat_h = hidden.reshape(-1, hidden.size(-1))
    loss = _ChunkedLinearCrossEntropy.apply(flat_h, weight, labels.reshape(-1), chunk_tokens, shard)
    return loss.view(lead)


def full_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Reference: materialize all logits (fp32 copy, as megatron does), then cross-entropy."""
    logits = (hidden @ weight.t()).float()
    flat = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.size(-1)), labels.reshape(-1), reduction="none"
    )
    return flat.view(labels.shape)
