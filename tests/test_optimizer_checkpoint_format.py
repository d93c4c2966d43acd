"""Which layouts can load megatron's distributed-optimizer checkpoint formats: the basis of
`checkpoint.optim_reshardable: auto` (`prolong_nemo.recipes.config.optim_checkpoint_format`).

megatron-core's own DistributedDataParallel + DistributedOptimizer + dist_checkpointing, on CPU
over gloo (one torchrun of 2 ranks, one of 1): every rank sets its shard of the fp32 master
weights and both Adam moments to values fixed by (parameter, element), saves, and a model in
another layout loads and compares element by element.

- 'dp_reshardable' (Bridge's `dist_ckpt_optim_fully_reshardable=False`) saved at TP1 DP2 loads
  exactly at TP1 CP2 (the 64K -> 512K chain in miniature: the optimizer shards over DP x CP)
  and at DP1 (one rank); at TP2, or with DDP buckets of another size, loading fails.
- 'fully_reshardable' saved at TP1 DP2 loads at TP2; saved again there, it loads back at TP1
  DP2 exactly; with padded DDP bucket ends it does not even load back in its own layout.

Test-only shims, applied in the worker processes only (a CPU has no CUDA):
- `torch.Tensor.type()` names CPU tensors `torch.cuda.*`: DistributedOptimizer accepts
  parameters only by those type strings;
- megatron's param_and_grad_buffer, distributed_data_parallel, distrib_optimizer and optimizer
  modules see `prolong_nemo.cpu_compat`'s CPU-device `torch` (they allocate buffers and flags
  on `torch.cuda.current_device()` / "cuda"), besides `apply_cpu_patches`;
- megatron's fully-reshardable loader skips Adam's `step`, then looks it up among the states to
  set (KeyError) when the optimizer is torch's Adam (no TE / Apex, so on a CPU), whose state
  holds a tensor `step`; the shim marks it as not given (megatron sets `step` from the
  param groups itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = 10_000_000  # one DDP bucket for the tiny model (about 0.1M parameters)
SMALL_BUCKET = 20_000  # several buckets, their ends padded (the tiny widths are not multiples of 128)


def _run(tmp_path: Path, nproc: int, phase: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / f"{phase}.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           __file__, phase, str(tmp_path), str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optim_format")
    return _run(tmp, 2, "two_ranks") | _run(tmp, 1, "one_rank")


def test_dp_reshardable_follows_dp_and_cp_changes(results):
    assert results["dp_reshardable tp1 dp2 -> tp1 cp2"] == "equal"
    assert results["dp_reshardable tp1 dp2 -> tp1 dp1"] == "equal"


def test_dp_reshardable_refuses_another_tp_or_bucket_size(results):
    assert results["dp_reshardable tp1 dp2 -> tp2"].startswith("refused")
    assert results["dp_reshardable tp1 dp2 -> tp1 dp2, other buckets"].startswith("refused")


def test_fully_reshardable_follows_a_tp_change(results):
    assert results["fully_reshardable tp1 dp2 -> tp2"] == "loaded"
    assert results["fully_reshardable tp1 dp2 -> tp2 -> tp1 dp2"] == "equal"


def test_fully_reshardable_misaligns_states_across_padded_buckets(results):
    """megatron-core (0.17-0.19) behaviour that `plan` warns about: the fully reshardable save
    gathers every bucket without its end padding into one tensor, then slices it with the
    parameters' offsets in the padded buffer (`buffer.param_index_map`), so every parameter after
    a padded bucket end saves another parameter's fp32 master weights and Adam moments ("param
    range exceeds unpadded buffer ... data corruption", megatron's own warning). Bucket ends are
    padded to lcm(DP x CP, 128) elements: never at Llama-3 widths (multiples of 4,096) with a
    power-of-two DP x CP, but here. If this starts failing, megatron fixed it: drop the warning."""
    assert results["fully_reshardable, padded buckets, same layout"] == "misaligned"


# ---------------------------------------------------------------------------------------------
# The worker (run by torchrun; not collected by pytest)
# ---------------------------------------------------------------------------------------------
def _apply_test_shims() -> None:
    import importlib

    import torch

    from prolong_nemo.cpu_compat import _MARK, _CpuDeviceTorch, apply_cpu_patches

    apply_cpu_patches(force=True)
    for name in ("megatron.core.distributed.param_and_grad_buffer", "megatron.core.distributed.distributed_data_parallel",
                 "megatron.core.optimizer.distrib_optimizer", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(name)
        if not getattr(module.torch, _MARK, False):
            module.torch = _CpuDeviceTorch()
    plain_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        out = plain_type(self, *args, **kwargs)
        if not args and not kwargs and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    torch.Tensor.type = cuda_type_name

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_without_step(self, model_param, tensors):
        return set_states(self, model_param, {"step": None, **tensors})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_without_step


class _Layout:
    """A model + DDP + DistributedOptimizer in one (tp, cp) layout on the current world."""

    def __init__(self, tp: int, cp: int, bucket: int = BUCKET):
        import torch
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        from prolong_nemo.model.builder import ParallelSizes, build_gpt_model
        from tests.model_fixtures import tiny_arch

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tp, 1, context_parallel_size=cp)
        get_cuda_rng_tracker().reset()
        model_parallel_cuda_manual_seed(1)
        torch.manual_seed(0)
        model = build_gpt_model(tiny_arch(), 256, backend="local", parallel=ParallelSizes(tp=tp, cp=cp)).bfloat16()
        model.config.bf16, model.config.params_dtype = True, torch.bfloat16
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                                   grad_reduce_in_fp32=True, bucket_size=bucket)
        self.model = DistributedDataParallel(model.config, ddp_config, model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16,
                            use_distributed_optimizer=True), [self.model])
        self.names = {p: n for n, p in self.model.named_parameters()}
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for opt in self._parts():
            opt._init_optimizer_states_with_dummy_values()

    def _parts(self):
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _states(self):
        """(name, tp rank, element range in the local parameter, state key, tensor) per shard."""
        for opt in self._parts():
            for param, (gbuf, dtype, bucket) in opt.model_param_gbuf_map.items():
                r = opt.gbuf_ranges[gbuf][dtype][bucket]["param_map"][param]["param"]
                for key, t in opt._get_main_param_and_optimizer_states(param).items():
                    if key != "step":
                        yield self.names[param], r.start, r.end, key, t

    @staticmethod
    def expected(name: str, start: int, end: int, key: str):
        import torch

        base = (sum(map(ord, name)) * 7919 + {"param": 1, "exp_avg": 2, "exp_avg_sq": 3}[key] * 104729) % 100003
        return ((torch.arange(start, end, dtype=torch.float64) * 31 + base) % 997 / 997.0).float()

    def fill(self) -> None:
        for name, start, end, key, t in self._states():
            t.data.copy_(self.expected(name, start, end, key))

    def matches(self) -> bool:
        """Every shard holds the values `fill` gave it (valid for the layout that filled them)."""
        import torch
        import torch.distributed as dist

        ok = all(torch.equal(t.data.float(), self.expected(n, s, e, k)) for n, s, e, k, t in self._states())
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _metadata(self, fmt: str) -> dict:
        # what Bridge's _build_sharded_state_dict_metadata writes; the fully reshardable save
        # gathers over gloo here (the "mem_efficient" variant: NCCL's all-gather needs CUDA),
        # which megatron documents as interchangeable with the all-gather one for loading
        return {"distrib_optim_sharding_type": fmt, "distrib_optim_fully_reshardable_mem_efficient": True,
                "singleton_local_shards": False, "chained_optim_avoid_prefix": True}

    def save(self, path: Path, fmt: str) -> None:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            path.mkdir(parents=True)
        dist.barrier()
        meta = self._metadata(fmt)
        model_sd = self.model.sharded_state_dict(metadata=meta)
        dist_checkpointing.save({"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=meta)}, str(path), content_metadata=meta)

    def load(self, path: Path) -> str:
        """'loaded', or 'refused: <reason>' when megatron cannot read it in this layout."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        meta = dist_checkpointing.load_content_metadata(str(path))  # what Bridge does too
        model_sd = self.model.sharded_state_dict(metadata=meta)
        opt_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=meta)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            loaded = dist_checkpointing.load({"model": model_sd, "optimizer": opt_sd}, str(path))
            self.optimizer.load_state_dict(loaded["optimizer"])
        except (Exception, CheckpointException) as e:
            dist.barrier()
            return f"refused: {type(e).__name__}: {str(e)[:300]}"
        return "loaded"


def _worker(phase: str, root: str, out: str) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(300, exit=True)
    _apply_test_shims()
    dist.init_process_group("gloo")
    root_path = Path(root)
    dp_ckpt, full_ckpt, full_tp2 = root_path / "dp_reshardable", root_path / "fully_reshardable", root_path / "full_tp2"
    results: dict[str, str] = {}
    if phase == "two_ranks":
        a = _Layout(tp=1, cp=1)  # DP2
        a.fill()
        a.save(dp_ckpt, "dp_reshardable")
        a.save(full_ckpt, "fully_reshardable")
        b = _Layout(tp=1, cp=2)  # CP2 DP1: the same DP x CP group of 2
        status = b.load(dp_ckpt)
        results["dp_reshardable tp1 dp2 -> tp1 cp2"] = "equal" if status == "loaded" and b.matches() else status
        c = _Layout(tp=2, cp=1)
        results["dp_reshardable tp1 dp2 -> tp2"] = c.load(dp_ckpt)
        c = _Layout(tp=2, cp=1)
        results["fully_reshardable tp1 dp2 -> tp2"] = c.load(full_ckpt)
        c.save(full_tp2, "fully_reshardable")
        d = _Layout(tp=1, cp=1, bucket=SMALL_BUCKET)
        results["dp_reshardable tp1 dp2 -> tp1 dp2, other buckets"] = d.load(dp_ckpt)
        e = _Layout(tp=1, cp=1)
        status = e.load(full_tp2)
        results["fully_reshardable tp1 dp2 -> tp2 -> tp1 dp2"] = "equal" if status == "loaded" and e.matches() else status
        g = _Layout(tp=1, cp=1, bucket=SMALL_BUCKET)
        g.fill()
        g.save(root_path / "full_padded", "fully_reshardable")
        h = _Layout(tp=1, cp=1, bucket=SMALL_BUCKET)
        status = h.load(root_path / "full_padded")
        results["fully_reshardable, padded buckets, same layout"] = (
            ("equal" if h.matches() else "misaligned") if status == "loaded" else status)
    else:  # one rank: DP1
        f = _Layout(tp=1, cp=1)
        status = f.load(dp_ckpt)
        results["dp_reshardable tp1 dp2 -> tp1 dp1"] = "equal" if status == "loaded" and f.matches() else status
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
