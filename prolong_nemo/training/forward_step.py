"""The forward step shared by the CPU runner and the Megatron-Bridge entry.

Consumes the packed batch of docs/batch-contract.md (micro-batch size 1), builds THD
`PackedSeqParams`, partitions the row per document for context parallelism, runs the model
with the chosen loss path and returns megatron's `(output_tensor, loss_func)` pair.

Megatron-Bridge's stock `gpt_step` partitions packed batches inside its own `get_batch`;
a Bridge run that passes THIS forward step to `pretrain` bypasses that, so partitioning
stays on by default. Turn `partition_for_cp` off only when the data iterator already yields
this rank's tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch

from prolong_nemo.model.context_parallel import partition_batch_for_cp
from prolong_nemo.model.cross_entropy import DEFAULT_CHUNK_TOKENS
from prolong_nemo.model.loss import (
    ChunkedLossProcessor,
    LossImpl,
    chunked_loss_without_hook,
    masked_token_loss,
    supports_output_processor,
)


@dataclass(frozen=True)
class StepOptions:
    loss_impl: LossImpl = "chunked"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    # False only when batches arrive already split for this CP rank.
    partition_for_cp: bool = True
    # None: megatron-core's output_processor hook where the installed version has it.
    use_output_processor: bool | None = None


def packed_seq_params(batch: dict[str, torch.Tensor]):
    """THD `PackedSeqParams` from the contract keys (global boundaries, Python-int max lengths)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    def cu(key: str) -> torch.Tensor:
        return batch[key].reshape(-1).to(torch.int32)

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu("cu_seqlens_q"),
        cu_seqlens_kv=cu("cu_seqlens_kv"),
        cu_seqlens_q_padded=cu("cu_seqlens_q_padded"),
        cu_seqlens_kv_padded=cu("cu_seqlens_kv_padded"),
        max_seqlen_q=int(batch["max_seqlen_q"].reshape(-1)[0]),
        max_seqlen_kv=int(batch["max_seqlen_kv"].reshape(-1)[0]),
    )


def _cp_size_rank() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_model(model, batch: dict[str, torch.Tensor], options: StepOptions = StepOptions()) -> torch.Tensor:
    """Per-token loss [1, T_local] of one micro-batch (CP-local tokens)."""
    if options.partition_for_cp:
        batch = partition_batch_for_cp(batch, *_cp_size_rank())
    params = packed_seq_params(batch)
    kwargs = dict(labels=batch["labels"], packed_seq_params=params)
    if options.loss_impl == "chunked":
        hook = options.use_output_processor
        if hook is None:
            hook = supports_output_processor(model)
        if not hook:
            return chunked_loss_without_hook(
                model, batch["tokens"], batch["position_ids"], batch["labels"], params, options.chunk_tokens
            )
        kwargs.update(loss_mask=batch["loss_mask"], output_processor=ChunkedLossProcessor(options.chunk_tokens))
    elif options.loss_impl != "fused":
        raise ValueError(f"unknown loss_impl {options.loss_impl!r}")
    # Causal + document masking comes from packed_seq_params: no attention mask tensor.
    return model(batch["tokens"], batch["position_ids"], None, **kwargs)


def forward_step(data_iterator: Iterator, model, options: StepOptions = StepOptions()):
    """Megatron forward step: (per-token loss, loss_func(output_tensor))."""
    device = next(model.parameters()).device
    batch = _to_device(next(data_iterator), device)
    if options.partition_for_cp:
        batch = partition_batch_for_cp(batch, *_cp_size_rank())
    output = run_model(model, batch, dataclasses.replace(options, partition_for_cp=False))
    return output, partial(masked_token_loss, batch["loss_mask"])


def make_forward_step(options: StepOptions = StepOptions()) -> Callable:
    """A two-argument `(data_iterator, model)` forward step, as megatron and Bridge call it.

    A plain function (not a partial) so Bridge's signature inspection sees exactly two
    parameters.
    """

    def step(data_iterator: Iterator, model):
        return forward_step(data_iterator, model, options)

    return step
