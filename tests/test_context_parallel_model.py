"""CP = 2 (gloo, 2 processes) over a per-document partitioned THD row equals the CP = 1 model:
per-token losses at the partition indices and the CP-summed gradients. Exercises the
partition, megatron's THD RoPE under CP, and the gather-based CP attention together."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from model_fixtures import collate_row, init_megatron_single_process, make_row, tiny_arch

LENGTHS = [13, 30, 7, 22]


def _batch(vocab: int):
    return collate_row(make_row(LENGTHS, vocab, seed=9, cp_size=2))


def _worker(rank: int, world: int, port: int, weights: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from prolong_nemo.cpu_compat import apply_cpu_patches
    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.megatron_config import ParallelSizes
    from prolong_nemo.training.forward_step import StepOptions, run_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    apply_cpu_patches(force=True)  # CPU models, even where CUDA exists
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    model_parallel_cuda_manual_seed(1)
    arch = tiny_arch()
    model = build_gpt_model(arch, 256, backend="local", parallel=ParallelSizes(cp=world))
    model.load_state_dict(torch.load(weights), strict=True)
    batch = _batch(arch.vocab_size)
    per_token = run_model(model, batch, StepOptions("chunked", chunk_tokens=16))  # partitions for this rank
    from prolong_nemo.model.context_parallel import thd_partition_indices

    idx = thd_partition_indices(batch["cu_seqlens_q_padded"][0], batch["tokens"].size(1), world, rank)
    (per_token * batch["loss_mask"][:, idx]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save({"index": idx, "loss": per_token.detach(), "grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_cp2_equals_cp1(tmp_path):
    from model_fixtures import _free_port

    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.training.forward_step import StepOptions, run_model

    init_megatron_single_process()
    arch = tiny_arch()
    torch.manual_seed(3)
    model = build_gpt_model(arch, 256, backend="local")
    weights = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), weights)
    batch = _batch(arch.vocab_size)
    ref = run_model(model, batch, StepOptions("fused"))
    (ref * batch["loss_mask"]).sum().backward()

    out = str(tmp_path / "cp")
    mp.spawn(_worker, args=(2, _free_port(), weights, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    covered = torch.cat([p["index"] for p in parts]).sort().values
    assert torch.equal(covered, torch.arange(batch["tokens"].size(1)))
    for p in parts:
        assert (p["loss"] - ref.detach()[:, p["index"]]).abs().max().item() <= 1e-5
    for name, param in model.named_parameters():
        summed = parts[0]["grads"][name] + parts[1]["grads"][name]
        assert (summed - param.grad).abs().max().item() <= 1e-5 * max(1.0, param.grad.abs().max().item()), name


# ---- per-token loss normalization across micro-batches AND CP ranks ------------------------

SCHEDULE_LENGTHS = ([12], [100, 58, 7])  # 11 vs 162 targets: the micro-batch means differ


def _schedule_worker(rank: int, world: int, port: int, weights: str, out: str) -> None:
    """CP = 2 through megatron's schedule + the runner's finalize_grads (sum over DP x CP,
    divide by the global token count), as a real CPU training step does."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from prolong_nemo.cpu_compat import apply_cpu_patches
    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.loss import global_token_mean
    from prolong_nemo.model.megatron_config import ParallelSizes
    from prolong_nemo.training.cpu.runner import finalize_grads
    from prolong_nemo.training.forward_step import StepOptions, make_forward_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    apply_cpu_patches(force=True)  # CPU models, even where CUDA exists
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    model_parallel_cuda_manual_seed(1)
    arch = tiny_arch()
    model = build_gpt_model(arch, 256, backend="local", parallel=ParallelSizes(cp=world))
    model.load_state_dict(torch.load(weights), strict=True)
    model.config.finalize_model_grads_func = finalize_grads
    batches = [collate_row(make_row(n, arch.vocab_size, seed=i, cp_size=world)) for i, n in enumerate(SCHEDULE_LENGTHS)]
    model.zero_grad(set_to_none=True)
    reports = get_forward_backward_func()(
        forward_step_func=make_forward_step(StepOptions("chunked", chunk_tokens=24)),
        data_iterator=iter(batches), model=[model], num_microbatches=len(batches), seq_length=256,
        micro_batch_size=1, forward_only=False,
    )
    mean = global_token_mean(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save({"mean": mean, "grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_cp2_schedule_gives_global_token_mean_gradient(tmp_path):
    """Independent reference: one process, no CP, explicit (sum of all target losses) /
    (all targets) over both micro-batches; every CP rank must end with exactly its gradient."""
    from model_fixtures import _free_port

    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.training.forward_step import StepOptions, run_model

    init_megatron_single_process()
    arch = tiny_arch()
    torch.manual_seed(4)
    model = build_gpt_model(arch, 256, backend="local")
    weights = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), weights)
    batches = [collate_row(make_row(n, arch.vocab_size, seed=i, cp_size=2)) for i, n in enumerate(SCHEDULE_LENGTHS)]
    model.zero_grad(set_to_none=True)
    losses = [run_model(model, b, StepOptions("fused")) for b in batches]
    sums = [(l * b["loss_mask"]).sum() for l, b in zip(losses, batches)]
    counts = [b["loss_mask"].sum() for b in batches]
    assert [int(c) for c in counts] == [11, 162]
    reference = sum(sums) / sum(counts)
    reference.backward()
    # the reference is distinguishable from the mean of micro-batch means
    assert abs((sums[0] / counts[0] + sums[1] / counts[1]).item() / 2 - reference.item()) > 1e-3

    out = str(tmp_path / "sched")
    mp.spawn(_schedule_worker, args=(2, _free_port(), weights, out), nprocs=2, join=True)
    for r in range(2):
        part = torch.load(f"{out}.{r}")
        assert abs(part["mean"] - reference.item()) <= 1e-6, (part["mean"], reference.item())
        for name, param in model.named_parameters():
            diff = (part["grads"][name] - param.grad).abs().max().item()
            assert diff <= 1e-6 * max(1.0, param.grad.abs().max().item()), (r, name, diff)
