"""The chunked loss inside a TP=2 megatron model (gloo, 2 processes) equals megatron's own
vocab-parallel cross-entropy; under sequence parallelism (which megatron's local spec only
builds with TE/apex norms) the processor's SP gather/reduce-scatter is checked directly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from prolong_nemo.cpu_compat import apply_cpu_patches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    apply_cpu_patches(force=True)  # CPU models, even where CUDA exists
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(7)


def _model_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from model_fixtures import collate_row, make_row, tiny_arch

    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.loss import masked_token_loss
    from prolong_nemo.model.megatron_config import ParallelSizes
    from prolong_nemo.training.forward_step import StepOptions, run_model

    _init(rank, world, port)
    torch.manual_seed(7)
    arch = tiny_arch()
    model = build_gpt_model(arch, 256, backend="local", parallel=ParallelSizes(tp=world))
    batch = collate_row(make_row([40, 50, 38], arch.vocab_size, seed=4))
    results = {}
    for impl in ("fused", "chunked"):
        model.zero_grad(set_to_none=True)
        per_token = run_model(model, batch, StepOptions(impl, chunk_tokens=33))
        loss_sum, n, _ = masked_token_loss(batch["loss_mask"], per_token)
        (loss_sum / n).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[impl] = {"loss": per_token.detach(), "grads": grads}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_chunked_loss_under_tensor_parallel_equals_megatron_loss(tmp_path):
    from model_fixtures import _free_port

    out = str(tmp_path / "tp")
    mp.spawn(_model_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        fused, chunked = r["fused"], r["chunked"]
        assert fused["loss"].abs().max() > 1.0
        assert (fused["loss"] - chunked["loss"]).abs().max().item() <= 1e-5
        for name, g in fused["grads"].items():
            assert (g - chunked["grads"][name]).abs().max().item() <= 1e-5, (rank, name)


def _sp_inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(24, 1, 16, generator=g)  # [s, b, h]
    weight = torch.randn(60, 16, generator=g) * 0.5
    labels = torch.randint(0, 60, (1, 24), generator=g)
    return hidden, weight, labels


def _output_layer(**attributes) -> torch.nn.Module:
    """An output layer stand-in: a module (the processor runs through its hooks) with these attributes."""
    layer = torch.nn.Module()
    for name, value in attributes.items():
        setattr(layer, name, value)
    return layer


def _sp_worker(rank: int, world: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from prolong_nemo.model.loss import ChunkedLossProcessor

    _init(rank, world, port)
    hidden, weight, labels = _sp_inputs()
    s, v = hidden.size(0) // world, weight.size(0) // world
    h_local = hidden[rank * s : (rank + 1) * s].clone().requires_grad_()  # sequence-parallel shard
    w_local = weight[rank * v : (rank + 1) * v].clone().requires_grad_()  # vocab shard
    layer = _output_layer(tp_group=parallel_state.get_tensor_model_parallel_group(), sequence_parallel=True, weight=w_local)
    loss = ChunkedLossProcessor(chunk_tokens=5)(
        hidden_states=h_local, output_layer=layer, output_weight=None, labels=labels, config=SimpleNamespace()
    )
    loss.sum().backward()
    torch.save({"loss": loss.detach(), "grad_h": h_local.grad, "grad_w": w_local.grad}, f"{out}.{rank}")


def _run_workers(worker, out: str, world: int = 2) -> list[dict]:
    from model_fixtures import _free_port

    mp.spawn(worker, args=(world, _free_port(), out), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}") for r in range(world)]


def _full_reference():
    """The unsharded loss and gradients: the full LM head + cross-entropy on one process."""
    from prolong_nemo.model.cross_entropy import full_linear_cross_entropy

    hidden, weight, labels = _sp_inputs()
    hidden.requires_grad_()
    weight.requires_grad_()
    ref = full_linear_cross_entropy(hidden.transpose(0, 1), weight, labels)  # [b, s]
    ref.sum().backward()
    return ref.detach(), hidden, weight


def test_sequence_parallel_mapping_of_the_chunked_processor(tmp_path):
    parts = _run_workers(_sp_worker, str(tmp_path / "sp"))
    ref, hidden, weight = _full_reference()
    for p in parts:
        assert (p["loss"] - ref).abs().max().item() <= 1e-5
    assert (torch.cat([p["grad_h"] for p in parts]) - hidden.grad).abs().max().item() <= 1e-5
    assert (torch.cat([p["grad_w"] for p in parts]) - weight.grad).abs().max().item() <= 1e-5


def _no_group_attr_worker(rank: int, world: int, port: int, out: str) -> None:
    """An output layer without a `tp_group` attribute (older megatron-core layers): the
    processor must still reduce over megatron's TP group, not treat the shard as the vocabulary."""
    from types import SimpleNamespace

    from prolong_nemo.model.loss import ChunkedLossProcessor

    _init(rank, world, port)
    hidden, weight, labels = _sp_inputs()
    v = weight.size(0) // world
    h = hidden.clone().requires_grad_()  # no sequence parallelism: every rank has all tokens
    w_local = weight[rank * v : (rank + 1) * v].clone().requires_grad_()
    layer = _output_layer(sequence_parallel=False, weight=w_local)
    loss = ChunkedLossProcessor(chunk_tokens=7)(
        hidden_states=h, output_layer=layer, output_weight=None, labels=labels, config=SimpleNamespace()
    )
    loss.sum().backward()
    torch.save({"loss": loss.detach(), "grad_h": h.grad, "grad_w": w_local.grad}, f"{out}.{rank}")


def test_chunked_processor_falls_back_to_megatron_tp_group(tmp_path):
    parts = _run_workers(_no_group_attr_worker, str(tmp_path / "nogroup"))
    ref, hidden, weight = _full_reference()
    for p in parts:
        assert (p["loss"] - ref).abs().max().item() <= 1e-5
        # megatron's TP region mapping all-reduced the hidden gradient over the two shards
        assert (p["grad_h"] - hidden.grad).abs().max().item() <= 1e-5
    assert (torch.cat([p["grad_w"] for p in parts]) - weight.grad).abs().max().item() <= 1e-5
