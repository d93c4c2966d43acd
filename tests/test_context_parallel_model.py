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
    apply_cpu_patches()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    model_parallel_cuda_manual_seed(1)
    arch = tiny_arch()
    model = build_gpt_model(arch, 256, backend="local", parallel=ParallelSizes(cp=world))
    model.load_state_dict(torch.load(weights), strict=False)
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
