"""Per-token loss: the LM-head output processor and the Megatron loss function.

Both loss paths return the same thing, a per-token fp32 loss [b, s] (local tokens under
CP), so one loss function serves both:
- "chunked": `ChunkedLossProcessor`, passed as `GPTModel.forward(output_processor=...)`
  (megatron-core >= 0.18, e.g. NGC 26.06): LM head + cross-entropy in token chunks, logits
  never whole. megatron-core 0.17 (NGC 26.04) has no such hook: `chunked_loss_without_hook`,
  same math.
- "fused": megatron's own output layer + `compute_language_model_loss` (native fused CE
  where `cross_entropy_loss_fusion` is on).

`masked_token_loss` returns (sum, token count, report): with `calculate_per_token_loss=True`
megatron divides the gradients by the token count summed over micro-batches and DP x CP,
which is the global token mean ProLong's SFT uses.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from prolong_nemo.model.cross_entropy import DEFAULT_CHUNK_TOKENS, VocabShard, chunked_linear_cross_entropy

LossImpl = Literal["chunked", "fused"]


def supports_output_processor(model) -> bool:
    """Whether the installed megatron-core GPTModel.forward has the `output_processor` hook."""
    return "output_processor" in inspect.signature(type(unwrap_model(model)).forward).parameters


@dataclass(frozen=True)
class ChunkedLossProcessor:
    """`output_processor` for GPTModel: per-token loss [b, s] via chunked LM head + CE."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __call__(self, *, hidden_states: Tensor, output_layer, output_weight, labels, config, **_) -> Tensor:
        if getattr(config, "use_mup", False):
            raise ValueError("MuP logit scaling is not supported by the chunked loss")
        if labels is None:  # no targets (inference): plain logits, [b, s, V]
            logits, _ = output_layer(hidden_states, weight=output_weight)
            return logits.transpose(0, 1).contiguous()
        # Run as output_layer's forward so that every hook on the module fires before its
        # weight is read: megatron DDP's pre-hook waits for the weight's bucket all-gather
        # under overlap_param_gather (reading it unhooked reads half-gathered rows and leaves
        # the handle pending until the next iteration's assert).
        return _call_as_forward(output_layer, self._loss, hidden_states, output_layer, output_weight, labels)

    def _loss(self, hidden_states: Tensor, output_layer, output_weight, labels: Tensor) -> Tensor:
        weight = output_weight if output_weight is not None else output_layer.weight
        # (a Float16Module wrapper may have cast hidden states to fp32 on the fallback path)
        hidden = _enter_vocab_parallel_region(hidden_states.to(weight.dtype), output_layer)
        group = _tp_group(output_layer)
        rank = group.rank() if group is not None else 0
        shard = VocabShard(start=rank * weight.size(0), group=group)
        loss = chunked_linear_cross_entropy(hidden, weight, labels.transpose(0, 1), self.chunk_tokens, shard)
        return loss.transpose(0, 1).contiguous()


_NO_FORWARD = object()


def _call_as_forward(module: torch.nn.Module, fn, *args):
    """`fn(*args)` run through `module(...)`, i.e. with the module's (and global) hooks.

    torch has no public "run this module's hooks" call, so `fn` briefly becomes the
    instance's `forward` and torch's own `Module.__call__` dispatches the hooks around it.
    """
    previous = vars(module).get("forward", _NO_FORWARD)
    module.forward = fn
    try:
        return module(*args)
    finally:
        if previous is _NO_FORWARD:
            del module.forward
        else:
            module.forward = previous


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def chunked_loss_without_hook(model, tokens, position_ids, labels, packed_seq_params, chunk_tokens: int) -> Tensor:
    """Chunked per-token loss for megatron-core versions without `output_processor` (0.17).

    GPTModel returns the decoder's (final-normed) hidden states when `post_process` is off,
    so the flag is lowered for this one call and the LM head + CE run chunked here.
    """
    core = unwrap_model(model)
    if not core.post_process:  # not the last pipeline stage: hidden states go to the next one
        return model(tokens, position_ids, None, packed_seq_params=packed_seq_params)
    core.post_process = False
    try:
        hidden = model(tokens, position_ids, None, packed_seq_params=packed_seq_params)
    finally:
        core.post_process = True
    weight = core.shared_embedding_or_output_weight() if core.share_embeddings_and_output_weights else None
    return ChunkedLossProcessor(chunk_tokens)(
        hidden_states=hidden, output_layer=core.output_layer, output_weight=weight, labels=labels, config=core.config
    )


def _tp_group(output_layer):
    """The output layer's TP group; megatron's global TP group when the layer does not carry one.

    Never "no group" while model parallelism is initialized: without the group every rank
    would treat its vocabulary shard as the whole vocabulary (silently wrong loss under TP).
    """
    group = getattr(output_layer, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_tensor_model_parallel_group()
    return group


def _enter_vocab_parallel_region(hidden: Tensor, output_layer) -> Tensor:
    """Same TP mapping as ColumnParallelLinear: identity/all-reduce, or SP all-gather/reduce-scatter."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    group = _tp_group(output_layer)
    if group is None or group.size() == 1:
        return hidden
    if getattr(output_layer, "sequence_parallel", False):
        return gather_from_sequence_parallel_region(hidden, group=group)
    return copy_to_tensor_model_parallel_region(hidden, group=group)


def masked_token_loss(loss_mask: Tensor, output_tensor: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Megatron per-token loss function: (sum of masked losses, token count, report)."""
    losses = output_tensor.reshape(-1).float()
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.cat([loss_sum.detach().view(1), num_tokens.float().view(1)])
    return loss_sum, num_tokens, {"lm loss": report}


def global_token_mean(reports: list[dict[str, Tensor]], group=None) -> float:
    """Loss to log: total loss sum / total tokens across micro-batches (and `group`, e.g. DP x CP)."""
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    return float(total[0] / total[1].clamp(min=1))
